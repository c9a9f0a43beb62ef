"""Cached rerun: the demo config twice in a fresh workspace; the second run should recompute nothing.

Prints both wall times and the ratio second/first (goal <= 5%). Baseline = the first (cold) run, same process
setup. Both runs go through `keystep run` in a subprocess with no Prefect server configured: the first starts
Prefect's temporary server, the second finds every stage in the catalog and starts none. Usage: python bench/cached_rerun.py [CONFIG]  (default configs/demo.yaml)
--smoke: configs/micro.yaml on 16 problems, one epoch (seconds, for the test suite).
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")
SMOKE_SETTINGS = ["--set", "data.train.n=16", "--set", "train.epochs=1", "--set", "eval.include_untrained=false"]


def timed_run(config: str, workspace: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", config, "--workspace", workspace,
                        *(SMOKE_SETTINGS if SMOKE else [])], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"keystep run failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/micro.yaml" if SMOKE else "configs/demo.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        first = timed_run(config, tmp)
        second = timed_run(config, tmp)
    ratio = second / first
    print(json.dumps({"bench": "cached_rerun", "metric": "second run wall time / first run wall time",
                      "value": round(second, 2), "baseline": round(first, 2), "ratio": round(ratio, 4),
                      "goal": "ratio <= 0.05", "met": ratio <= 0.05, "details": {"config": config}}))


if __name__ == "__main__":
    main()
