"""Paired comparisons of experiment arms: a gap is real only when it survives resampling questions and seeds."""
import random

import numpy as np
import pytest

from tasks.compare import (accuracy_within, bootstrap_interval, equal_time_gap, equal_time_line, gap_line, paired_gap,
                           replace_section, seeds_needed, t_interval, write_report)


def arms(p_a: float, p_b: float, n_q: int = 300, seeds=(0, 1, 2, 3, 4), shared: float = 0.0):
    """Runs and per-question predictions of two arms: each question right with probability p (per seed);
    `shared`: how much of a question's outcome both arms share (a hard question is hard for both)."""
    rng = random.Random(0)
    hard = [rng.random() for _ in range(n_q)]
    runs, predictions = [], {}
    for s in seeds:
        for name, p in (("a", p_a), ("b", p_b)):
            right = {("synthetic", f"q{i}"): (hard[i] if rng.random() < shared else rng.random()) < p for i in range(n_q)}
            fp = f"eval-{name}-{s}"
            predictions[fp] = right
            runs.append({"variant": name, "seed": s, "eval_fp": fp, "train_fp": f"train-{name}-{s}",
                         "accuracy": {"student/synthetic/test": sum(right.values()) / n_q}})
    return runs, predictions


def test_t_interval_of_known_differences():
    lo, hi = t_interval([0.1, 0.2, 0.3])
    assert lo == pytest.approx(0.2 - 4.303 * 0.1 / 3 ** 0.5, abs=1e-3) and hi == pytest.approx(0.2 + 4.303 * 0.1 / 3 ** 0.5, abs=1e-3)
    assert t_interval([0.1]) == (-float("inf"), float("inf"))   # one seed says nothing about seed spread


def test_bootstrap_interval_brackets_the_question_level_gap():
    always, never = np.ones((3, 200)), np.zeros((3, 200))
    assert bootstrap_interval(always, never) == (1.0, 1.0)
    assert bootstrap_interval(always, always) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    a, b = (rng.random((3, 400)) < 0.6).astype(float), (rng.random((3, 400)) < 0.6).astype(float)
    lo, hi = bootstrap_interval(a, b)
    assert lo < a.mean() - b.mean() < hi and hi - lo < 0.15


def test_a_clear_gap_is_real_and_no_gap_is_not():
    runs, preds = arms(0.75, 0.55)
    g = paired_gap(runs, preds, "a", "b", "synthetic/test")
    assert g["real"] and g["wins"] == 5 and g["boot_ci"][0] > 0 and g["seed_ci"][0] > 0 and g["n_questions"] == 300
    runs, preds = arms(0.6, 0.6)
    g = paired_gap(runs, preds, "a", "b", "synthetic/test")
    assert not g["real"] and g["boot_ci"][0] < 0 < g["boot_ci"][1]


def test_without_paired_predictions_no_gap_is_called_real():
    runs, _ = arms(0.75, 0.55)
    g = paired_gap(runs, {}, "a", "b", "synthetic/test")
    assert g["boot_ci"] is None and not g["real"]


def test_gap_line_states_the_spread_of_the_paired_difference():
    g = {"a": "a", "b": "b", "column": "synthetic/test", "seeds": [0, 1, 2], "diffs": [0.01, 0.03, 0.05],
         "mean": 0.03, "wins": 3, "seed_ci": t_interval([0.01, 0.03, 0.05]), "boot_ci": None, "real": False}
    assert "seed spread of the paired difference ±2.0%" in gap_line(g)
    assert "seed spread of the paired difference unknown (1 seed)" in gap_line({**g, "seeds": [0], "diffs": [0.01],
                                                                               "seed_ci": t_interval([0.01])})


def test_report_states_each_gap_with_both_intervals(tmp_path):
    runs, preds = arms(0.75, 0.55)
    for r in runs:       # what the study files hold
        r.update(supervised_tokens=1000, history=[{"epoch": 1, "loss": 2.0, "tokens": 6000, "tokens_per_s": 100.0},
                                                  {"epoch": 2, "loss": 1.0, "tokens": 6000, "tokens_per_s": 50.0}],
                 by_steps={"synthetic/test": {"1": 0.9, "2": 0.5}})
    out = write_report("t", runs, preds, tmp_path / "r.md", [("a", "b")])
    text = (tmp_path / "r.md").read_text()
    assert "| a | 5 |" in text and "supervised tokens" in text and "bootstrap over 300 questions" in text
    assert "**real**" in text and "seed spread" in text and "| a | 90.0% | 50.0% |" in text
    assert (tmp_path / "r-learning-curves.png").read_bytes()[:4] == b"\x89PNG" and len(out["gaps"]) == 1
    assert out["rows"][0]["supervised_tokens"] == 1000
    assert out["rows"][0]["train_min"] == 3.0 and "| 1000 |" not in text and "| 0.00M | 3.0 |" in text   # 60 s + 120 s


def test_each_gap_says_whether_its_seed_interval_decides_it():
    assert seeds_needed([0.01, 0.03, 0.02, 0.04]) == 4            # sd 1.3 points: t(0.975, 3)·sd/2 ≤ 3 points
    need = seeds_needed([-0.05, 0.02, -0.08, 0.04, 0.0])
    assert need > 5
    runs, preds = arms(0.6, 0.6, seeds=(0, 1, 2))
    line = gap_line(paired_gap(runs, preds, "a", "b", "synthetic/test"))
    assert "decisive" in line


def test_studies_share_one_results_file_each_in_its_own_section(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(replace_section(path, "one", "# one\nfirst"))
    path.write_text(replace_section(path, "two", "# two"))
    path.write_text(replace_section(path, "one", "# one\nsecond"))
    text = path.read_text()
    assert "second" in text and "first" not in text and text.index("# one") < text.index("# two")
    assert text.count("<!-- study: one -->") == 1


def test_accuracy_at_equal_training_time_takes_each_arm_where_the_cheaper_one_stopped():
    def run(variant, seed, seconds, curve):
        return {"variant": variant, "seed": seed, "curve": {str(e): acc for e, acc in curve.items()},
                "curve_set": "synthetic/test, first 100 questions",
                "history": [{"epoch": e, "tokens": 100 * t, "tokens_per_s": 100.0} for e, t in enumerate(seconds, 1)]}

    runs = [run("fast", 0, [10] * 4, {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}),     # 40 s in all: the budget
            run("slow", 0, [30, 30], {1: 0.55, 2: 0.9}),                     # within 40 s: epoch 1 only
            run("fast", 1, [10] * 4, {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.7}),
            run("slow", 1, [15, 15], {1: 0.6, 2: 0.8}),                      # 30 s: the budget; fast reaches epoch 3
            {**run("fast", 2, [10], {1: 0.1}), "curve": {}},                 # a file from before curves were kept
            run("slow", 2, [10], {1: 0.2})]
    g = equal_time_gap(runs, "slow", "fast")
    assert g["seeds"] == [0, 1] and g["diffs"] == pytest.approx([0.55 - 0.8, 0.8 - 0.7])
    assert g["budget_min"] == pytest.approx(35 / 60)
    assert "slow − fast at equal training time" in equal_time_line(g) and "over 2 seeds" in equal_time_line(g)
    assert equal_time_gap(runs, "slow", "nobody") is None
    assert accuracy_within(runs[1], 29) is None                              # not one epoch within the budget
