"""Comparison stage for experiment grids: one report from many distill runs, with paired statistics.

Input: the study files of an experiment (tasks/study.py): per arm (variant × seed) its accuracy per evaluation set
and per step count, per-epoch training metrics, supervised tokens and per-question predictions. Output: a comparison
table (rows = variants, columns = evaluation sets: mean ± std over seeds of the trained student's accuracy, and the
tokens each arm's loss supervised), accuracy by step count, for each listed gap the mean difference, a paired
comparison across seeds and a 95% bootstrap interval over test questions from the paired predictions, plots
(accuracy per arm with intervals, learning curves), and the markdown report: the experiment's section of its
`results_path` (several studies share docs/results.md, each between its own markers). The Prefect task adds the
`experiment-results` table artifact and an `experiment-report` markdown artifact.

A gap is called real only when both intervals exclude 0: the bootstrap over questions (is the difference more
than which questions happened to be in the test set?) and the paired t interval over seeds (more than which
training trajectory a seed happened to take?). The study decides it when the interval over seeds is at most ±3
points; until then the report says how many seeds the spread seen so far needs.
"""
from __future__ import annotations

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
        if arm and all(training_seconds(r) is not None for r in arm):
            row["train_min"] = statistics.fmean(training_seconds(r) for r in arm) / 60
        rows.append(row)
    return rows, columns


def training_seconds(run: dict) -> float | None:
    """A run's training time, its epochs' tokens over their tokens/s (what compute an arm cost, beside what it
    reached: on-policy steps sample and score inside the epoch); None for files without them."""
    epochs = run.get("history") or []
    if not epochs or not all(h.get("tokens") and h.get("tokens_per_s") for h in epochs):
        return None
    return sum(h["tokens"] / h["tokens_per_s"] for h in epochs)


def accuracy_within(run: dict, budget_s: float) -> float | None:
    """The learning curve's accuracy of the last epoch a run finished within `budget_s` seconds of training (None:
    no curve, no timing, or not even one epoch by then)."""
    epochs, curve = run.get("history") or [], run.get("curve") or {}
    reached, elapsed = None, 0.0
    for h in epochs:
        if not (h.get("tokens") and h.get("tokens_per_s")) or str(h["epoch"]) not in curve:
            return None
        elapsed += h["tokens"] / h["tokens_per_s"]
        if elapsed > budget_s * (1 + 1e-9):
            break
        reached = curve[str(h["epoch"])]
    return reached


def equal_time_gap(runs: list[dict], a: str, b: str) -> dict | None:
    """The gap a − b at equal training time, seed by seed: each arm's learning-curve accuracy at the last epoch it
    finished within the cheaper arm's whole training time (the literature's claim for on-policy distillation is
    compute efficiency). Seeds without curves (study files written before they were kept) are left out."""
    by = {(r["variant"], r["seed"]): r for r in runs}
    seeds, diffs, budgets = [], [], []
    for s in sorted({s for v, s in by if v == a} & {s for v, s in by if v == b}):
        ta, tb = training_seconds(by[(a, s)]), training_seconds(by[(b, s)])
        if ta is None or tb is None:
            continue
        budget = min(ta, tb)
        acc_a, acc_b = accuracy_within(by[(a, s)], budget), accuracy_within(by[(b, s)], budget)
        if acc_a is None or acc_b is None:
            continue
        seeds.append(s)
        diffs.append(acc_a - acc_b)
        budgets.append(budget)
    if not seeds:
        return None
    return {"a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs),
            "seed_ci": t_interval(diffs), "budget_min": statistics.fmean(budgets) / 60,
            "curve_set": by[(a, seeds[0])].get("curve_set")}


def equal_time_line(g: dict) -> str:
    lo, hi = g["seed_ci"]
    return (f"{g['a']} − {g['b']} at equal training time (the cheaper arm's, {g['budget_min']:.0f} min on average; "
            f"each arm's last epoch within it, on {g['curve_set']}) = {g['mean']:+.1%} over {len(g['seeds'])} "
            f"seed{'s' * (len(g['seeds']) != 1)}, t interval [{lo:+.1%}, {hi:+.1%}]")


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


SEED_HALF_WIDTH = 0.03   # a study decides a gap when its 95% interval over seeds is at most ±3 points wide


def seeds_needed(diffs: list[float], half_width: float = SEED_HALF_WIDTH) -> int | None:
    """Fewest seeds whose 95% t interval of the mean paired difference is ±`half_width`, at the spread seen so far."""
    from scipy.stats import t

    if len(diffs) < 2:
        return None
    sd = statistics.stdev(diffs)
    return next(n for n in range(2, 10_000) if t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= half_width)


def gap_line(g: dict) -> str:
    """One gap in words. The spread is that of the paired per-seed differences — what the seed interval and the
    seed count needed are computed from — not the arms' own spreads (their sum overstates it when seeds move both)."""
    lo, hi = g["seed_ci"]
    spread = (f"±{statistics.stdev(g['diffs']):.1%}" if len(g["diffs"]) > 1 else "unknown (1 seed)")
    boot = (f"bootstrap over {g['n_questions']} questions [{g['boot_ci'][0]:+.1%}, {g['boot_ci'][1]:+.1%}]"
            if g["boot_ci"] else "no paired predictions")
    verdict = "real" if g["real"] else "not shown (an interval includes 0)"
    half = (hi - lo) / 2
    need = seeds_needed(g["diffs"])
    width = (f"seed interval ±{half:.1%}: decisive" if half <= SEED_HALF_WIDTH + 1e-12 else
             f"seed interval ±{half:.1%}: not decisive yet" + (f" (about {need} seeds at this spread)" if need else ""))
    return (f"{g['a']} − {g['b']} on {g['column']} = {g['mean']:+.1%} (paired over {len(g['seeds'])} seeds: "
            f"{g['a']} higher on {g['wins']}, t interval [{lo:+.1%}, {hi:+.1%}]; {boot}; "
            f"seed spread of the paired difference {spread}; {width}): **{verdict}**")


def steps_markdown(runs: list[dict]) -> list[str]:
    """Accuracy by number of steps: per arm, mean over seeds (and the per-seed values)."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in runs:
        for column, by in r.get("by_steps", {}).items():
            for k, acc in by.items():
                cells.setdefault((r["variant"], column), {}).setdefault(k, []).append(acc)
    if not cells:
        return []
    lines = []
    for column in sorted({c for _, c in cells}):
        steps = sorted({k for (v, c), by in cells.items() if c == column for k in by}, key=int)
        lines += ["", f"Accuracy on {column} by number of steps (trained student, mean over seeds):", "",
                  "| variant | " + " | ".join(f"{k} step{'s' * (k != '1')}" for k in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for v in dict.fromkeys(r["variant"] for r in runs):
            by = cells.get((v, column), {})
            lines.append(f"| {v} | " + " | ".join(f"{statistics.fmean(by[k]):.1%}" if k in by else "" for k in steps) + " |")
    return lines


def comparison_markdown(title: str, rows: list[dict], columns: list[str], plots: dict[str, str], notes: list[str],
                        relative_to: Path | None = None, runs: list[dict] = (), missing: list = ()) -> str:
    tokens = any("supervised_tokens" in r for r in rows)
    minutes = any("train_min" in r for r in rows)
    head = ("| variant | seeds | " + " | ".join(columns) + (" | supervised tokens" if tokens else "")
            + (" | training min" if minutes else "") + " |")
    lines = [f"# {title}", "", "Trained student accuracy, mean ± std over seeds"
             + ("; supervised tokens: tokens the loss summed over, all epochs, mean over seeds" if tokens else "")
             + ("; training min: the train stage's epochs (sampling and scoring included), mean over seeds, on "
                "whatever machine ran each" if minutes else "") + ".",
             "", head, "|---|---:|" + "---:|" * (len(columns) + tokens + minutes)]
    for r in rows:
        cells = [f"{r[c]['mean']:.1%} ± {r[c]['std']:.1%}" for c in columns]
        if tokens:
            cells.append(f"{r['supervised_tokens'] / 1e6:.2f}M" if "supervised_tokens" in r else "")
        if minutes:
            cells.append(f"{r['train_min']:.1f}" if "train_min" in r else "")
        lines.append(f"| {r['variant']} | {r['n_seeds']} | " + " | ".join(cells) + " |")
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): " + ", ".join(f"{v} seed {s}" for v, s in missing) + "."]
    if notes:
        lines += ["", "Gaps (a gap is real only when the interval over questions and the one over seeds both exclude 0; "
                  f"the study decides it when the interval over seeds is at most ±{SEED_HALF_WIDTH:.0%}):",
                  "", *[f"- {n}" for n in notes]]
    lines += steps_markdown(list(runs))
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


def replace_section(path: Path, name: str, markdown: str) -> str:
    """`path`'s text with study `name`'s section (between its markers) replaced by `markdown`, or appended; the other
    studies' sections stay as they are."""
    start, end = f"<!-- study: {name} -->", f"<!-- /study: {name} -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return (text.rstrip() + "\n\n" if text.strip() else "") + block


def write_report(title: str, runs: list[dict], predictions: dict, results_path: str | Path,
                 pairs: list[tuple[str, str]] = (), study: str | None = None, missing: list = ()) -> dict:
    """Table, plots and markdown; into `results_path` (study `study`'s section of it, when named), the plots beside
    it. `runs`: the study files' summaries; `predictions`: eval_fp -> {(dataset, example_id): correct}."""
    target = Path(results_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rows, columns = comparison_rows(runs)
    gaps = [g for c in columns for a, b in pairs if (g := paired_gap(runs, predictions, a, b, c))]
    notes = [gap_line(g) for g in gaps]
    notes += [equal_time_line(g) for a, b in pairs if (g := equal_time_gap(runs, a, b))]
    stem = f"{target.stem}-{study}" if study else target.stem
    plots = {"accuracy by variant": comparison_plot(rows, columns, target.parent / f"{stem}.png")}
    curves = learning_curves_plot(runs, target.parent / f"{stem}-learning-curves.png")
    if curves:
        plots["learning curves"] = curves
    markdown = comparison_markdown(title, rows, columns, plots, notes, relative_to=target.parent, runs=runs,
                                   missing=missing)
    target.write_text(replace_section(target, study, markdown) if study else markdown)
    return {"rows": rows, "columns": columns, "gaps": gaps, "markdown": markdown, "results_path": str(target),
            "plot": plots["accuracy by variant"], "plots": plots}


def study_report(exp) -> dict:
    """The experiment's report from its study files alone (`keystep report`, and the experiment flow's last step)."""
    from tasks.study import load_study

    runs, predictions, missing = load_study(exp)
    if not runs:
        raise ValueError(f"no finished runs under '{exp.study_dir}' yet; run `keystep experiment` on the study first")
    results = exp.results_path or str(Path(exp.study_dir) / "results.md")
    out = write_report(exp.name, runs, predictions, results, [tuple(g) for g in exp.gaps],
                       study=Path(exp.study_dir).name, missing=missing)
    return {**out, "runs": runs, "missing": missing}


# ---- Prefect wrapper ----------------------------------------------------------------------------------
from tasks.stage import artifact_markdown, prefect_task  # noqa: E402


@prefect_task(name="compare")
def compare_task(exp) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    report = study_report(exp)
    create_table_artifact(key="experiment-results", description=exp.name, table=[
        {"variant": r["variant"], "seeds": r["n_seeds"],
         **{c: f"{r[c]['mean']:.1%} ± {r[c]['std']:.1%}" for c in report["columns"]}} for r in report["rows"]])
    create_markdown_artifact(key="experiment-report", description=report["results_path"],
                             markdown=artifact_markdown(report["markdown"], Path(report["results_path"]).parent))
    return {k: v for k, v in report.items() if k not in ("rows", "gaps")}
