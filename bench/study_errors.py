"""What kind of mistakes each arm of a committed synthetic:arith study makes (issue 19: R1's KPOD seed-2 outlier).

Reads only the committed files docs/studies/<study>/<arm>/seed-<k>.{json,predictions.csv} and regenerates the test
problems from each run's stored data.eval spec (synthetic:arith is deterministic), then prints per (arm, seed):
accuracy, wrong answers, near misses among them (|answer − truth| ≤ 2: an arithmetic slip in one step, e.g.
11 + 9 = 19, rather than a wrong plan), answers that are an earlier value of the problem (its start or a step's result
before the last: a step left out or the chain stopped early), the final epoch's training loss, and the facts of
one-step problems the run gets wrong most often. Needs no training and no workspace.

Prints one JSON line: value = near misses per seed of ARM, baseline = those of std_cot on the same seeds.
Usage: python bench/study_errors.py [STUDY] [ARM]     (default: study-demo kpod)
       --smoke: seeds 0-1 of ARM and std_cot only (seconds, for the test suite)
"""
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")

from pydantic import TypeAdapter  # noqa: E402

from keystep.config import DatasetSpec  # noqa: E402
from tasks.ingest import load_examples  # noqa: E402

STEP = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)")


def problems(eval_spec: dict) -> dict:
    """example_id → Example of the run's (first) eval set, loaded as ingest loads it."""
    spec = TypeAdapter(DatasetSpec).validate_python(eval_spec)
    if spec.source != "synthetic:arith":
        raise SystemExit(f"study_errors: needs a synthetic:arith eval set, this run's is {spec.source!r}")
    return {ex.example_id: ex for ex in load_examples(spec)[0]}


def run_errors(summary: Path) -> dict:
    info = json.loads(summary.read_text())
    exs = problems(info["config"]["data"]["eval"][0])
    rows = list(csv.DictReader(open(summary.with_name(summary.stem + ".predictions.csv"))))
    wrong = [r for r in rows if r["correct"] == "0"]
    near, earlier, facts = 0, 0, Counter()
    for r in wrong:
        ex = exs[r["example_id"]]
        steps = STEP.findall(ex.reference_rationale)
        try:
            said = float(r["extracted"])
        except ValueError:             # no number extracted: neither kind
            continue
        if abs(said - float(ex.answer)) <= 2:
            near += 1
        elif said in {float(s[0]) for s in steps}:   # the start value or a step's result before the last
            earlier += 1
        if len(steps) == 1:
            a, op, b, c = steps[0]
            facts[f"{a} {op} {b} = {c} (says {r['extracted']})"] += 1
    return {"arm": info["variant"], "seed": info["seed"], "n": len(rows), "wrong": len(wrong), "near": near,
            "earlier": earlier, "accuracy": 1 - len(wrong) / len(rows), "final_loss": info["history"][-1]["loss"],
            "facts": facts.most_common(3)}


def main(study: str = "study-demo", arm: str = "kpod") -> None:
    folder = ROOT / "docs" / "studies" / study
    paths = sorted(folder.glob("*/seed-*.json"))
    if SMOKE:
        paths = [p for p in paths if p.parent.name in (arm, "std_cot") and p.stem in ("seed-0", "seed-1")]
    runs = [run_errors(p) for p in paths]
    if not runs:
        raise SystemExit(f"study_errors: no finished runs under {folder}")
    print(f"{'arm':24} seed  acc    wrong  near misses  earlier value  final loss  most repeated one-step mistakes")
    for r in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        facts = "; ".join(f"{f} ×{k}" for f, k in r["facts"] if k > 1)
        print(f"{r['arm']:24} {r['seed']:4d}  {r['accuracy']:5.1%}  {r['wrong']:5d}  {r['near']:5d} "
              f"({r['near'] / max(r['wrong'], 1):4.0%})  {r['earlier']:5d} ({r['earlier'] / max(r['wrong'], 1):4.0%})"
              f"  {r['final_loss']:10.3f}  {facts}")
    by = {(r["arm"], r["seed"]): r["near"] for r in runs}
    seeds = sorted(s for a, s in by if a == arm and ("std_cot", s) in by)
    value, baseline = [by[(arm, s)] for s in seeds], [by[("std_cot", s)] for s in seeds]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    print(json.dumps({"bench": "study_errors", "metric": f"{study}: near-miss errors per seed, {arm}",
                      "value": round(mean(value), 1), "baseline": round(mean(baseline), 1),
                      "ratio": round(mean(value) / mean(baseline), 3) if mean(baseline) else None,
                      "goal": "diagnosis (no goal): the baseline is std_cot on the same seeds", "met": None,
                      "details": {"seeds": seeds, "by_seed": value, "baseline_by_seed": baseline, "arm": arm,
                                  "baseline_arm": "std_cot"}}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
