"""Comparison stage for experiment grids: one table from many distill runs.

Input: per arm (variant × seed) the distill summary (its accuracy per model/dataset/split). Output: a comparison
table (rows = variants, columns = evaluation sets, mean ± std over seeds of the trained student's accuracy), a
bar plot (PNG), a markdown report (written to the experiment's `results_path` and the workspace), and the
`experiment-results` table artifact plus an `experiment-report` markdown artifact.
"""
from __future__ import annotations

import statistics
from pathlib import Path


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
        rows.append(row)
    return rows, columns


def gap_verdicts(rows: list[dict], column: str, pairs: list[tuple[str, str]]) -> list[str]:
    """For each (a, b): is mean(a) > mean(b), and is the gap larger than the seed spread (std(a) + std(b))?"""
    by = {r["variant"]: r[column] for r in rows if column in r}
    out = []
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        gap = by[a]["mean"] - by[b]["mean"]
        spread = by[a]["std"] + by[b]["std"]
        verdict = "exceeds" if abs(gap) > spread else "within"
        out.append(f"{a} − {b} = {gap:+.1%} ({verdict} the seed spread ±{spread:.1%})")
    return out


def comparison_markdown(title: str, rows: list[dict], columns: list[str], plot: str | None, notes: list[str],
                        relative_to: Path | None = None) -> str:
    head = "| variant | seeds | " + " | ".join(columns) + " |"
    lines = [f"# {title}", "", "Trained student accuracy, mean ± std over seeds.", "", head,
             "|---|---:|" + "---:|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]['mean']:.1%} ± {r[c]['std']:.1%}" for c in columns]
        lines.append(f"| {r['variant']} | {r['n_seeds']} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Gaps:", "", *[f"- {n}" for n in notes]]
    if plot:
        link = str(Path(plot).relative_to(relative_to)) if relative_to else plot
        lines += ["", f"![accuracy by variant]({link})"]
    return "\n".join(lines) + "\n"


def comparison_plot(rows: list[dict], columns: list[str], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(rows))
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.6))
    for i, c in enumerate(columns):
        ax.bar(x + i * width, [r[c]["mean"] for r in rows], width, yerr=[r[c]["std"] for r in rows], capsize=3, label=c)
    ax.set_xticks(x + width * (len(columns) - 1) / 2, [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def write_report(title: str, runs: list[dict], out_dir: Path, results_path: str | None,
                 pairs: list[tuple[str, str]] = ()) -> dict:
    """Table, plot and markdown into `out_dir` (and `results_path`, with the plot beside it)."""
    rows, columns = comparison_rows(runs)
    notes = [n for c in columns for n in gap_verdicts(rows, c, list(pairs))]
    target = Path(results_path) if results_path else out_dir / "results.md"
    plot = comparison_plot(rows, columns, target.parent / f"{target.stem}.png")
    markdown = comparison_markdown(title, rows, columns, plot, notes, relative_to=target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(markdown)
    return {"rows": rows, "columns": columns, "markdown": markdown, "results_path": str(target), "plot": plot}


# ---- Prefect wrapper ----------------------------------------------------------------------------------
from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402


@task(name="compare")
def compare_task(title: str, runs: list[dict], out_dir: str, results_path: str | None,
                 pairs: list[tuple[str, str]] = ()) -> dict:
    report = write_report(title, runs, Path(out_dir), results_path, pairs)
    create_table_artifact(key="experiment-results", description=title, table=[
        {"variant": r["variant"], "seeds": r["n_seeds"],
         **{c: f"{r[c]['mean']:.4f} ± {r[c]['std']:.4f}" for c in report["columns"]}} for r in report["rows"]])
    create_markdown_artifact(key="experiment-report", markdown=report["markdown"], description=report["results_path"])
    return {k: v for k, v in report.items() if k != "rows"}
