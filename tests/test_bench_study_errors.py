"""bench/study_errors.py: a study run's wrong answers sorted into near misses and earlier values."""
import csv
import importlib.util
import json
from pathlib import Path

from tasks.ingest import generate_arith

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("study_errors", ROOT / "bench" / "study_errors.py")
study_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_errors)


def test_wrong_answers_are_sorted_by_kind(tmp_path):
    eval_spec = {"source": "synthetic:arith", "name": "s", "split": "test", "n": 30, "seed": 1, "min_steps": 2,
                 "max_steps": 2, "max_operand": 12}
    exs = generate_arith(30, 1, 2, 2, 12)
    start = [int(study_errors.STEP.findall(e.reference_rationale)[0][0]) for e in exs[:4]]
    said = [exs[0].answer, int(exs[1].answer) + 1, start[2], 999]     # right, near miss, earlier value, other
    (tmp_path / "seed-0.json").write_text(json.dumps({
        "variant": "kpod", "seed": 0, "config": {"data": {"eval": [eval_spec]}}, "history": [{"loss": 0.5}]}))
    with open(tmp_path / "seed-0.predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "example_id", "correct", "extracted"])
        for e, s in zip(exs[:4], said):
            w.writerow(["s", e.example_id, int(str(s) == e.answer), s])
    r = study_errors.run_errors(tmp_path / "seed-0.json")
    assert (r["n"], r["wrong"], r["near"], r["earlier"]) == (4, 3, 1, 1)
    assert r["accuracy"] == 0.25 and r["final_loss"] == 0.5
