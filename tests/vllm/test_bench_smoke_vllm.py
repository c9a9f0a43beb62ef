"""The vLLM benchmarks' smoke runs (tests/test_bench_smoke.py runs the others): they need .venv-vllm, which
`make test-vllm` builds (and then sets KEYSTEP_VLLM_PYTHON, as for the other tests here)."""
import os

import pytest

from tests.conftest import ROOT
from tests.test_bench_smoke import run_smoke

BENCHES = ["captured_scores", "eval_throughput", "teacher_scores", "teacher_temperature", "teacher_vllm"]


@pytest.mark.skipif(not os.environ.get("KEYSTEP_VLLM_PYTHON") or not (ROOT / ".venv-vllm" / "bin" / "python").exists(),
                    reason="needs KEYSTEP_VLLM_PYTHON and .venv-vllm (run `make test-vllm`)")
@pytest.mark.parametrize("name", BENCHES)
def test_vllm_bench_smoke(name):
    run_smoke(name)
