"""Comparison stage for experiment grids: one table from many distill runs, with paired statistics.

Input: per arm (variant × seed) the distill summary (accuracy per model/dataset/split, eval and train
fingerprints); the catalog's per-question predictions and per-epoch training metrics. Output: a comparison table
(rows = variants, columns = evaluation sets: mean ± std over seeds of the trained student's accuracy, and the
tokens each arm's loss supervised), for each listed gap the mean difference, a paired comparison across seeds
and a 95% bootstrap interval over test questions from the paired predictions, plots (accuracy per arm with
intervals, learning curves), a markdown report (written to the experiment's `results_path`), and the
`experiment-results` table artifact plus an `experiment-report` markdown artifact.

A gap is called real only when both intervals exclude 0: the bootstrap over questions (is the difference more
than which questions happened to be in the test set?) and the paired t interval over seeds (more than which
training trajectory a seed happened to take?).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from tasks.stage import pyplot, save_figure

BOOTSTRAP = 2000


def comparison_rows(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """`runs`: {"variant", "seed", "accuracy": {"student/<dataset>/<split>": x, ...}} -> (rows, eval-set columns).
    Each row: variant, n_seeds, and per column mean, std and the per-seed values."""
    columns = sorted({k.split("/", 1)[1] for r in runs for k in r["accuracy"] if k.startswith("student/")})
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    rows = []
    for v in variants:
        arm = [r for r in runs if r["variant"] == v]
        row = {"variant": v, "n_seeds": len(arm)}
        for c in columns:
            vals = [r["accuracy"][f"student/{c}"] for r in arm if f"student/{c}" in r["accuracy"]]
            row[c] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "values": vals}
        if all("supervised_tokens" in r for r in arm):
            row["supervised_tokens"] = statistics.fmean(r["supervised_tokens"] for r in arm)
        rows.append(row)
    return rows, columns


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """95% paired t interval of the mean of `diffs` (one difference per seed)."""
    from scipy.stats import t

    if len(diffs) < 2:
        return -math.inf, math.inf
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def bootstrap_interval(a: np.ndarray, b: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean-over-seeds(acc_a − acc_b) when the test questions are resampled.
    `a`, `b`: (seeds, questions) 0/1 correctness, the same questions in the same order, seeds paired by row."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[1], size=(n_boot, a.shape[1]))
    gaps = (a[:, idx].mean(axis=2) - b[:, idx].mean(axis=2)).mean(axis=0)
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return float(lo), float(hi)


def paired_gap(runs: list[dict], predictions: dict[str, dict[tuple[str, str], bool]], a: str, b: str,
               column: str) -> dict | None:
    """The gap a − b on one evaluation set, paired by seed and by question. `predictions`: eval_fp -> {(dataset,
    example_id): correct} of the trained student."""
    dataset = column.split("/")[0]
    by = {(r["variant"], r["seed"]): r for r in runs}
    seeds = sorted({s for v, s in by if v == a} & {s for v, s in by if v == b})
    if not seeds:
        return None
    pa = [predictions.get(by[(a, s)].get("eval_fp"), {}) for s in seeds]
    pb = [predictions.get(by[(b, s)].get("eval_fp"), {}) for s in seeds]
    diffs = [by[(a, s)]["accuracy"][f"student/{column}"] - by[(b, s)]["accuracy"][f"student/{column}"] for s in seeds]
    out = {"a": a, "b": b, "column": column, "seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs),
           "wins": sum(d > 0 for d in diffs), "seed_ci": t_interval(diffs), "boot_ci": None}
    questions = sorted(set.intersection(*[{q for q in p if q[0] == dataset} for p in pa + pb])) if all(pa + pb) else []
    if questions:
        mat = lambda ps: np.array([[ps_[q] for q in questions] for ps_ in ps], dtype=float)  # noqa: E731
        out["boot_ci"] = bootstrap_interval(mat(pa), mat(pb))
        out["n_questions"] = len(questions)
    intervals = [out["seed_ci"]] + ([out["boot_ci"]] if out["boot_ci"] else [])
    out["real"] = bool(out["boot_ci"]) and all(lo > 0 or hi < 0 for lo, hi in intervals)
    return out


def gap_line(g: dict, spread: float) -> str:
    lo, hi = g["seed_ci"]
    boot = (f"bootstrap over {g['n_questions']} questions [{g['boot_ci'][0]:+.1%}, {g['boot_ci'][1]:+.1%}]"
            if g["boot_ci"] else "no paired predictions")
    verdict = "real" if g["real"] else "not shown (an interval includes 0)"
    return (f"{g['a']} − {g['b']} on {g['column']} = {g['mean']:+.1%} (paired over {len(g['seeds'])} seeds: "
            f"{g['a']} higher on {g['wins']}, t interval [{lo:+.1%}, {hi:+.1%}]; {boot}; seed spread ±{spread:.1%}): "
            f"**{verdict}**")


def comparison_markdown(title: str, rows: list[dict], columns: list[str], plots: dict[str, str], notes: list[str],
                        relative_to: Path | None = None) -> str:
    tokens = any("supervised_tokens" in r for r in rows)
    head = "| variant | seeds | " + " | ".join(columns) + (" | supervised tokens |" if tokens else " |")
    lines = [f"# {title}", "", "Trained student accuracy, mean ± std over seeds"
             + ("; supervised tokens: tokens the loss summed over, all epochs, mean over seeds." if tokens else "."),
             "", head, "|---|---:|" + "---:|" * (len(columns) + tokens)]
    for r in rows:
        cells = [f"{r[c]['mean']:.1%} ± {r[c]['std']:.1%}" for c in columns]
        if tokens:
            cells.append(f"{r['supervised_tokens'] / 1e6:.2f}M" if "supervised_tokens" in r else "")
        lines.append(f"| {r['variant']} | {r['n_seeds']} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Gaps (a gap is real only when the interval over questions and the one over seeds both exclude 0):",
                  "", *[f"- {n}" for n in notes]]
    for name, plot in plots.items():
        link = str(Path(plot).relative_to(relative_to)) if relative_to else plot
        lines += ["", f"![{name}]({link})"]
    return "\n".join(lines) + "\n"


def comparison_plot(rows: list[dict], columns: list[str], path: Path) -> str:
    """Accuracy per arm: mean over seeds, error bars = the 95% t interval of the mean over seeds."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(rows))
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.6))
    for i, c in enumerate(columns):
        half = [(t_interval(r[c]["values"])[1] - r[c]["mean"]) if len(r[c]["values"]) > 1 else 0.0 for r in rows]
        ax.bar(x + i * width, [r[c]["mean"] for r in rows], width, yerr=half, capsize=3, label=c)
    ax.set_xticks(x + width * (len(columns) - 1) / 2, [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (95% interval over seeds)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def learning_curves_plot(runs: list[dict], path: Path) -> str | None:
    """Training loss by epoch, mean over seeds, one line per arm."""
    curves: dict[str, list[list[float]]] = {}
    for r in runs:
        if r.get("history"):
            curves.setdefault(r["variant"], []).append([h["loss"] for h in r["history"]])
    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for variant, seeds in curves.items():
        n = min(len(c) for c in seeds)
        ax.plot(range(1, n + 1), [statistics.fmean(c[e] for c in seeds) for e in range(n)], marker=".", label=variant)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def with_run_details(catalog, runs: list[dict]) -> tuple[list[dict], dict[str, dict[tuple[str, str], bool]]]:
    """Each run with its per-epoch training history and supervised tokens; the trained student's per-question
    predictions of each evaluation."""
    out, predictions = [], {}
    for r in runs:
        history = [json.loads(h["metrics_json"]) for h in catalog.query("train_history", train_fp=r["train_fp"])]
        extra = {"history": history}
        if history and all("supervised_tokens" in h for h in history):
            extra["supervised_tokens"] = sum(h["supervised_tokens"] for h in history)
        out.append({**r, **extra})
        if r.get("eval_fp"):
            predictions[r["eval_fp"]] = {(p["dataset"], p["example_id"]): bool(p["correct"])
                                         for p in catalog.query("student_predictions", eval_fp=r["eval_fp"])}
    return out, predictions


def write_report(title: str, runs: list[dict], out_dir: Path, results_path: str | None,
                 pairs: list[tuple[str, str]] = (), catalog=None) -> dict:
    """Table, plots and markdown into `out_dir` (and `results_path`, with the plots beside it)."""
    predictions: dict = {}
    if catalog is not None:
        runs, predictions = with_run_details(catalog, runs)
    rows, columns = comparison_rows(runs)
    spread = {(r["variant"], c): r[c]["std"] for r in rows for c in columns}
    gaps = [g for c in columns for a, b in pairs if (g := paired_gap(runs, predictions, a, b, c))]
    notes = [gap_line(g, spread[(g["a"], g["column"])] + spread[(g["b"], g["column"])]) for g in gaps]
    target = Path(results_path) if results_path else out_dir / "results.md"
    plots = {"accuracy by variant": comparison_plot(rows, columns, target.parent / f"{target.stem}.png")}
    curves = learning_curves_plot(runs, target.parent / f"{target.stem}-learning-curves.png")
    if curves:
        plots["learning curves"] = curves
    markdown = comparison_markdown(title, rows, columns, plots, notes, relative_to=target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(markdown)
    return {"rows": rows, "columns": columns, "gaps": gaps, "markdown": markdown, "results_path": str(target),
            "plot": plots["accuracy by variant"], "plots": plots}


# ---- Prefect wrapper ----------------------------------------------------------------------------------
from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from storage.workspace import Workspace  # noqa: E402
from tasks.stage import artifact_markdown  # noqa: E402


@task(name="compare")
def compare_task(title: str, runs: list[dict], workspace: str, results_path: str | None,
                 pairs: list[tuple[str, str]] = ()) -> dict:
    ws = Workspace(workspace)
    report = write_report(title, runs, ws.root / "reports" / "experiments", results_path, pairs, ws.catalog())
    create_table_artifact(key="experiment-results", description=title, table=[
        {"variant": r["variant"], "seeds": r["n_seeds"],
         **{c: f"{r[c]['mean']:.1%} ± {r[c]['std']:.1%}" for c in report["columns"]}} for r in report["rows"]])
    create_markdown_artifact(key="experiment-report", description=report["results_path"],
                             markdown=artifact_markdown(report["markdown"], Path(report["results_path"]).parent))
    return {k: v for k, v in report.items() if k not in ("rows", "gaps")}
