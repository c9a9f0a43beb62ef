"""Curriculum scheduling at scale (KPOD §4.3): 10k, 100k and 1M examples, 10 stages, on this machine.

Difficulties are drawn synthetically (1-8 steps per example, gamma-distributed step difficulty), clusters
uniformly over K = 5. Measures the whole schedule (budget, Greedy+Max per stage, updates) and compares the
solver's objective with plain density greedy on the same stage instances (the solver keeps the better of
greedy and its +Max augmentations, so the ratio is >= 1). Also times the TF-IDF/SVD K-means clustering of
synthetic:arith questions at 10k and 100k. Goal: <= 30 s at 100k and near-linear growth.
Usage: python bench/curriculum_scale.py [SIZES...]      --smoke: 1k and 2k examples, 20 small instances
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")

from keystep.config import CurriculumConfig  # noqa: E402
from tasks.curriculum import build_schedule, question_clusters  # noqa: E402


def instance(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n)
    flat = rng.gamma(2.0, 1.0, int(lengths.sum()))
    difficulties = np.split(flat, np.cumsum(lengths)[:-1])
    return difficulties, rng.integers(0, 5, n)


def main() -> None:
    sizes = [int(float(a)) for a in sys.argv[1:]] or ([1_000, 2_000] if SMOKE else [10_000, 100_000, 1_000_000])
    cfg = CurriculumConfig()
    times, ratios = {}, {}
    for n in sizes:
        difficulties, clusters = instance(n)
        t0 = time.perf_counter()
        sched = build_schedule(difficulties, clusters, 10, cfg)
        times[n] = time.perf_counter() - t0
        ratios[n] = sum(sched.solver_values) / max(sum(sched.greedy_values), 1e-12)
        print(f"n={n:>9,}: {times[n]:6.2f} s, Greedy+Max / density greedy objective {ratios[n]:.4f}", file=sys.stderr)
    # small random instances: both solvers against the brute-force optimum
    import itertools
    from tasks.curriculum import diversity_objective, greedy_max
    rng = np.random.default_rng(1)
    small_solver, small_greedy = [], []
    for _ in range(20 if SMOKE else 200):
        k = int(rng.integers(4, 12))
        cost, cl = rng.uniform(0, 10, k), rng.integers(0, 3, k)
        budget, beta = float(rng.uniform(0.1, 0.7) * cost.sum()), 12.0
        opt = max(diversity_objective(np.array(s, dtype=np.int64), cost, cl, beta)
                  for r in range(k + 1) for s in itertools.combinations(range(k), r) if cost[list(s)].sum() <= budget)
        sel = greedy_max(cost, cl, budget, beta)
        small_solver.append(sel.value / opt)
        small_greedy.append(sel.greedy_value / opt)
    cluster_times = {}
    from tasks.ingest import generate_arith
    for n in [s for s in sizes if s <= 100_000]:
        questions = [e.question for e in generate_arith(n, seed=0)]
        t0 = time.perf_counter()
        question_clusters(questions, cfg)
        cluster_times[n] = round(time.perf_counter() - t0, 2)
    at = 100_000 if 100_000 in times else sizes[-1]
    growth = {f"{a}->{b}": round(times[b] / times[a], 2) for a, b in zip(sizes, sizes[1:])}
    near_linear = all(times[b] / times[a] <= 1.5 * b / a for a, b in zip(sizes, sizes[1:]))
    print(json.dumps({"bench": "curriculum_scale", "metric": f"schedule wall time at {at:,} examples, 10 stages (s)",
                      "value": round(times[at], 2), "baseline": 30.0, "ratio": round(times[at] / 30.0, 3),
                      "goal": "<= 30 s at 100k, near-linear growth", "met": bool(times[at] <= 30.0 and near_linear),
                      "details": {"seconds": {str(k): round(v, 2) for k, v in times.items()}, "growth": growth,
                                  "near_linear": near_linear,
                                  "objective_vs_density_greedy": {str(k): round(v, 4) for k, v in ratios.items()},
                                  "small_instances_vs_brute_force": {
                                      "greedy_max_mean": round(float(np.mean(small_solver)), 4),
                                      "greedy_max_min": round(float(np.min(small_solver)), 4),
                                      "density_greedy_mean": round(float(np.mean(small_greedy)), 4),
                                      "density_greedy_min": round(float(np.min(small_greedy)), 4)},
                                  "kmeans_tfidf_seconds": {str(k): v for k, v in cluster_times.items()}}}))


if __name__ == "__main__":
    main()
