"""Benchmarks cannot rot unseen: every bench/ script runs in its smoke mode (`--smoke`: tiny sizes, seconds) and ends
with the JSON line DESIGN.md fixes. Those that need the vLLM environment run in tests/vllm (`make test-vllm`)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NEEDS_VLLM = {"teacher_vllm", "eval_throughput", "teacher_scores", "teacher_temperature", "captured_scores"}
KEYS = {"bench", "metric", "value", "baseline", "ratio", "goal", "met"}
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))


def run_smoke(name: str) -> dict:
    r = subprocess.run([sys.executable, f"bench/{name}.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"bench/{name}.py --smoke failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert KEYS <= set(line) and line["bench"] == name, line
    return line


@pytest.mark.parametrize("name", [b for b in BENCHES if b not in NEEDS_VLLM])
def test_bench_smoke(name):
    run_smoke(name)


def test_every_bench_has_a_smoke_run():
    from tests.vllm import test_bench_smoke_vllm

    assert NEEDS_VLLM <= set(BENCHES) and set(test_bench_smoke_vllm.BENCHES) == NEEDS_VLLM
    assert all("--smoke" in (ROOT / "bench" / f"{b}.py").read_text() for b in BENCHES)
