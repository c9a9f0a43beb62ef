"""Study files: each finished (variant, seed) run of an experiment, as small files that are committed with the code.

A study of many arms × seeds takes CPU-hours, so it is run over several sessions and its results must outlive the
workspace that made them. After each run the experiment flow writes, under the experiment's `study_dir`
(default docs/studies/<experiment file name>/):

    <variant>/seed-<k>.json            what ran (the arm's overrides and fingerprint, its resolved config, the train
                                       and eval fingerprints, keystep's commit, wall time) and what came out (accuracy per
                                       evaluation set and per step count, the per-epoch training metrics, the tokens
                                       the loss supervised, each epoch's accuracy on the learning curve's questions)
    <variant>/seed-<k>.predictions.csv per test question: dataset, example_id, correct, extracted answer

Both are written to a temp name and renamed, so a kill never leaves half a run. A run whose files exist with the
same arm fingerprint is not run again; files of an arm the study file now asks differently for are an error
(delete them to rerun; after a keystep change that alters results, delete them too). The report
(tasks/compare.py) is built from these files alone, so `keystep report FILE` re-derives every table and interval
without a catalog.

Input: the experiment config, the catalog of the arm's workspace (for a run that just finished). Output: the files,
and `load_study` -> (runs, per-question predictions) for the report.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

from keystep.config import ConfigError, ExperimentConfig, arm_config
from storage.fingerprint import fingerprint
from storage.workspace import write_atomic

EPOCH_KEYS = ("epoch", "stage", "loss", "tokens", "supervised_tokens", "weighted_tokens", "lr", "tokens_per_s")
# on_policy's figures, kept where an epoch has them (tasks/on_policy.py)
ON_POLICY_KEYS = ("on_policy_share", "samples", "sample_accuracy", "reverse_kl", "sample_s", "score_s", "update_s")


def arm_fp(exp: ExperimentConfig, variant: str, seed: int) -> str:
    """What a run is, as the study file asks for it: the arm's overrides (shared and its own), its seed, and the
    contents of the presets it names (base, variant base, pretrain) — not the resolved config, so a keystep upgrade
    that adds a setting with its old behaviour as the default keeps finished runs (each run file also records the
    resolved config and keystep's commit). Where a run ran (workspace) is not part of it."""
    arm = dict(exp.variants[variant])
    base = arm.pop("base", exp.base)
    text = lambda path: Path(path).read_text() if path else None  # noqa: E731
    shared = {k: v for k, v in exp.overrides.items() if not k.startswith("storage.")}
    teacher = {"teacher_preset": text(exp.teacher_preset)} if exp.teacher_preset else {}   # absent: fps unchanged
    return fingerprint("study-arm", {"base": text(base), "pretrain": text(exp.pretrain), "overrides": shared,
                                     "arm": arm, "seed": {k: seed for k in exp.seed_keys}, **teacher})


def run_paths(study_dir: str | Path, variant: str, seed: int) -> tuple[Path, Path]:
    folder = Path(study_dir) / variant
    return folder / f"seed-{seed}.json", folder / f"seed-{seed}.predictions.csv"


def finished_run(exp: ExperimentConfig, variant: str, seed: int) -> dict | None:
    """The run's summary when its files exist for this very arm; None when it has yet to run."""
    summary_path, predictions_path = run_paths(exp.study_dir, variant, seed)
    if not (summary_path.exists() and predictions_path.exists()):
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("arm_fp") != arm_fp(exp, variant, seed):
        raise ConfigError(f"{summary_path} was written by another config of arm '{variant}' seed {seed} (the "
                          f"experiment file, its base preset or its pretrain preset changed); delete "
                          f"{summary_path.parent} to run it again, or point study_dir elsewhere")
    return summary


def _portable(arm: dict) -> dict:
    """An arm's overrides as they read in the experiment file: a variant's `base` relative to the repository."""
    base = arm.get("base")
    if base:
        repo = Path(__file__).resolve().parents[1]
        arm = {**arm, "base": str(Path(base).relative_to(repo)) if Path(base).is_relative_to(repo) else base}
    return arm


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run(exp: ExperimentConfig, variant: str, seed: int, catalog, summary: dict, wall_s: float,
              config=None) -> dict:
    """The files of a run that just finished (`summary`: the distill flow's; `config`: the arm's resolved config),
    read from its catalog."""
    config = config or arm_config(exp, variant, seed)
    history = [json.loads(h["metrics_json"]) for h in catalog.query("train_history", train_fp=summary["train_fp"])]
    results = catalog.query("latest_results", eval_fp=summary["eval_fp"])
    by_steps: dict[str, dict[str, float]] = {}
    for r in results:
        if r["model_label"] == "student" and r["group_key"] == "n_steps":
            by_steps.setdefault(f"{r['dataset']}/{r['split']}", {})[r["group_value"]] = r["accuracy"]
    evaluation = (catalog.stage_output(summary["eval_fp"]) or {}).get("summary", {})
    record = {"variant": variant, "seed": seed, "arm_fp": arm_fp(exp, variant, seed),
              "overrides": _portable(exp.variants[variant]), "config": config.model_dump(mode="json"), "accuracy": summary["accuracy"], "by_steps": by_steps,
              "supervised_tokens": sum(h.get("supervised_tokens", 0) for h in history),
              "history": [{**{k: h.get(k) for k in EPOCH_KEYS}, **{k: h[k] for k in ON_POLICY_KEYS if k in h}}
                          for h in history],
              # each epoch's accuracy on the first eval.curve_questions questions: accuracy at equal training time
              "curve": {str(e): acc for e, acc in evaluation.get("curve", {}).items()},
              "curve_set": evaluation.get("curve_set"),
              "train_fp": summary["train_fp"], "eval_fp": summary["eval_fp"], "wall_s": round(wall_s, 1),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "keystep_commit": _commit()}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "example_id", "correct", "extracted"])
    for p in sorted(catalog.query("student_predictions", eval_fp=summary["eval_fp"]),
                    key=lambda p: (p["dataset"], p["example_id"])):
        writer.writerow([p["dataset"], p["example_id"], int(bool(p["correct"])), p["extracted"] or ""])
    summary_path, predictions_path = run_paths(exp.study_dir, variant, seed)
    write_atomic(predictions_path, out.getvalue())
    write_atomic(summary_path, json.dumps(record, indent=1) + "\n")   # last: the summary marks the run finished
    return record


def load_study(exp: ExperimentConfig) -> tuple[list[dict], dict[str, dict[tuple[str, str], bool]], list[tuple[str, int]]]:
    """(finished runs in plan order, eval_fp -> {(dataset, example_id): correct}, the (variant, seed) still missing)."""
    runs, predictions, missing = [], {}, []
    for variant, seed in exp.plan():
        summary = finished_run(exp, variant, seed)
        if summary is None:
            missing.append((variant, seed))
            continue
        runs.append(summary)
        with open(run_paths(exp.study_dir, variant, seed)[1], newline="") as f:
            predictions[summary["eval_fp"]] = {(row["dataset"], row["example_id"]): row["correct"] == "1"
                                               for row in csv.DictReader(f)}
    return runs, predictions, missing
