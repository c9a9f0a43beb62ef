"""Evaluate stage: greedy decoding on the evaluation sets, answer extraction, accuracy.

Input: the `Trained` checkpoint (and the untrained `Student` as a baseline), the ingested evaluation `Dataset`s,
`EvalConfig`. Output: `Evaluation`; rows in `eval_results` (accuracy per model, dataset, split, overall and per synthetic
step count) and `predictions` (every output with its extracted answer), under the eval fingerprint.
Decoding is batched with left padding, prompts sorted by length so a batch wastes little padding.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

from keystep.config import LABEL_FIRST, DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.answers import extract_answer, is_correct
from tasks.curriculum import Curriculum
from tasks.formats import format_prompt, generation_prompt
from tasks.ingest import Dataset
from tasks.stage import StageOutput, cached_output
from tasks.student import Student, load_student, pick_device
from tasks.teacher import Generation
from tasks.train import Trained

CODE_VERSION = "1"


class Evaluation(StageOutput):
    """Accuracy per "model/dataset/split"; rows of `eval_results` and `predictions` under `fp`."""
    n_predictions: int
    accuracy: dict[str, float]
    device: str


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device: str,
                    on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([generation_prompt(tokenizer, prompts[i]) for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # never decode past the model's context (a scratch student has a short one)
        room = getattr(model.config, "max_position_embeddings", None)
        new_tokens = max(1, min(max_new_tokens, room - enc["input_ids"].shape[1])) if room else max_new_tokens
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            outputs[i] = text.strip()
        if on_batch:
            on_batch(min(start + batch_size, len(order)), len(order))
    return outputs


def accuracy_rows(preds: list[dict], group_keys=("n_steps",)) -> list[dict]:
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for p in preds:
        groups[(p["model_label"], p["dataset"], p["split"], "all", "all")].append(p["correct"])
        for key in group_keys:
            if p["meta"].get(key) is not None:
                groups[(p["model_label"], p["dataset"], p["split"], key, str(p["meta"][key]))].append(p["correct"])
    return [{"model_label": m, "dataset": d, "split": s, "group_key": k, "group_value": v, "n": len(c),
             "n_correct": sum(c), "accuracy": sum(c) / len(c)} for (m, d, s, k, v), c in groups.items()]


def eval_lineage(config: DistillConfig, trained: Trained, student: Student, datasets: list[Dataset]) -> Lineage:
    what = {"eval": config.eval, "prompt": config.teacher.prompt_template, "target_format": config.train.target_format,
            "device": config.train.device}
    return Lineage("evaluate", what, (trained.fp, student.fp, *[d.fp for d in datasets]), CODE_VERSION)


def evaluate_student(ws: Workspace, config: DistillConfig, trained: Trained, student: Student, datasets: list[Dataset],
                     on_progress: Callable[[str, int, int], None] | None = None) -> Evaluation:
    """The trained student (and, with `eval.include_untrained`, the untrained one) on every evaluation set.
    Label-first target formats decode only the answer sentence (`label_max_new_tokens`) and read its first answer."""
    catalog, cfg, lineage = ws.catalog(), config.eval, eval_lineage(config, trained, student, datasets)
    if done := cached_output(catalog, lineage, Evaluation):
        return done
    fp, device = lineage.fp, pick_device(config.train.device)
    models = {"student": trained.final_dir, **({"untrained": student.model_dir} if cfg.include_untrained else {})}
    examples = []
    for ds in datasets:
        for ex in catalog.query("examples_of_dataset", dataset_fp=ds.fp):
            examples.append({**ex, "dataset": ds.name, "meta": json.loads(ex["meta_json"] or "{}")})
    prompts = [format_prompt(config.teacher, ex["question"]) for ex in examples]
    label_first = config.train.target_format in LABEL_FIRST
    preds = []
    for label, path in models.items():
        model, tokenizer = load_student(path, device=device)
        outputs = greedy_generate(model, tokenizer, prompts, cfg.label_max_new_tokens if label_first else cfg.max_new_tokens,
                                  cfg.batch_size, device,
                                  on_batch=(lambda d, t, label=label: on_progress(label, d, t)) if on_progress else None)
        del model
        for ex, prompt, out in zip(examples, prompts, outputs):
            extracted = extract_answer(out, ex["answer_type"], first=label_first)
            preds.append({"model_label": label, "dataset": ex["dataset"], "split": ex["split"], "meta": ex["meta"],
                          "example_id": ex["example_id"], "prompt": prompt, "output": out, "extracted": extracted,
                          "gold": ex["answer"],
                          "correct": is_correct(extracted, ex["answer"], ex["answer_type"], cfg.tolerance)})
    results = accuracy_rows(preds)
    out = Evaluation(fp=fp, n_predictions=len(preds), device=device,
                     accuracy={f"{r['model_label']}/{r['dataset']}/{r['split']}": r["accuracy"]
                               for r in results if r["group_key"] == "all"})
    with catalog.transaction() as con:
        con.execute("delete from eval_results where eval_fp = ?", [fp])
        con.execute("delete from predictions where eval_fp = ?", [fp])
        catalog.insert(con, "eval_results", [{"eval_fp": fp, **r} for r in results])
        catalog.insert(con, "predictions", [{"eval_fp": fp, **{k: v for k, v in p.items() if k not in ("meta", "split")}}
                                            for p in preds])
        catalog.record_stage(con, lineage, out.model_dump())
    return out


def results_table(rows: list[dict]) -> str:
    """Plain-text results table: accuracy per model, dataset/split and step count."""
    if not rows:
        return "(no evaluation results yet)"
    header = ["dataset", "split", "group", "model", "n", "correct", "accuracy"]
    body = [[r["dataset"], r["split"], "all" if r["group_key"] == "all" else f"{r['group_key']}={r['group_value']}",
             r["model_label"], str(r["n"]), str(r["n_correct"]), f"{r['accuracy']:.1%}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def summary_markdown(config_name: str, results: list[dict], teacher: Generation, datasets: list[Dataset],
                     train: Trained) -> str:
    lines = [f"# keystep results: {config_name}", "", "## Accuracy", "", "```", results_table(results), "```", "",
             "## Teacher", "",
             f"- rationales: {teacher.n} ({teacher.n_failed} failed), correct rate {teacher.correct_rate:.1%}",
             "", "## Data", ""]
    for d in datasets:
        bad = f", rejected {d.n_bad}: {d.bad_reasons}" if d.n_bad else ""
        lines.append(f"- {d.name}/{d.split}: {d.n_examples} examples{bad}")
    hist = train.history
    if hist:
        lines += ["", "## Training", "", f"- device {train.device}, {train.n_examples} sequences, "
                  f"{train.n_truncated} truncated, resumed from epoch {train.resumed_from_epoch}",
                  f"- loss: {train.loss}"
                  + (", curriculum stage by epoch: " + ", ".join(str(h["stage"]) for h in hist) if hist[0].get("stage") else ""),
                  "- loss by epoch: " + ", ".join(f"{h['loss']:.3f}" for h in hist),
                  f"- final checkpoint: `{train.final_dir}`"]
    return "\n".join(lines) + "\n"


# ---- Prefect wrapper ------------------------------------------------------------------------------
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.stage import stage_task, workspace_of  # noqa: E402


@stage_task("evaluate", eval_lineage, tags=["gpu"])
def evaluate_task(config: DistillConfig, trained: Trained, student: Student, datasets: list[Dataset]) -> Evaluation:
    ws = workspace_of(config)
    lineage = eval_lineage(config, trained, student, datasets)
    progress = create_progress_artifact(0.0, key="eval-progress", description=f"evaluating {lineage.fp}")
    labels = ["student", "untrained"] if config.eval.include_untrained else ["student"]

    def on_progress(label: str, done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * (labels.index(label) + done / total) / len(labels))

    out = evaluate_student(ws, config, trained, student, datasets, on_progress)
    rows = ws.catalog().query("latest_results", eval_fp=out.fp)
    create_table_artifact(key="distill-results", table=[{**r, "accuracy": round(r["accuracy"], 4)} for r in rows],
                          description="Accuracy per model, dataset, split and synthetic step count")
    return out


def publish_summary(config: DistillConfig, evaluation: Evaluation, generation: Generation, datasets: list[Dataset],
                    trained: Trained, curriculum: Curriculum | None = None) -> str:
    """The run's markdown report (<workspace>/reports/<eval fp>.md, also a Prefect artifact); for KPOD runs it
    includes the curriculum's per-stage table and plots (PNG files beside the report)."""
    ws = workspace_of(config)
    text = summary_markdown(config.data.train.name, ws.catalog().query("latest_results", eval_fp=evaluation.fp),
                            generation, datasets, trained)
    if curriculum:
        text += "\n" + curriculum.markdown
    path = ws.report_path(evaluation.fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    create_markdown_artifact(key="distill-summary", markdown=text, description=f"report: {path}")
    return str(path)
