"""The teacher-scores stage: exact top-k distributions, stored compactly, each sequence scored once."""
import numpy as np
import pytest
import torch

from storage.workspace import Workspace
from tasks import ingest, teacher
from tasks.formats import NO_CUT, encode_rationale
from tasks.stage import kept_rationales
from tasks.student import load_student
from tasks.teacher_scores import (TEACHER_SCORES, TeacherScoresInputs, load_scores, scorer_fingerprint,
                                  sequence_hash)
from tests.tasks.helpers import prepared


def scoring(cfg, model_dir, **settings):
    return cfg.model_copy(update={"teacher_scores": cfg.teacher_scores.model_copy(
        update={"model": model_dir, **settings})})


def test_scores_are_the_teachers_exact_top_k_and_cost_under_130_bytes_a_position_at_k_20(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=24)
    teacher_dir = st.model_dir      # any folder with the student's tokenizer: here the untrained student itself
    cfg = scoring(cfg, teacher_dir, k=20)
    out = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
    assert out.n_sequences == out.n_scored == 24 and out.k == 20
    model, tok = load_student(teacher_dir)
    rows = kept_rationales(cat, cfg, gen)
    ids = encode_rationale(tok, cfg.teacher, rows[3], NO_CUT).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.float()[0], dim=-1)
    top = logp.topk(20, dim=-1)
    stored_ids, stored_lp = load_scores(ws, out, [sequence_hash(ids)])[sequence_hash(ids)]
    assert stored_ids.shape == (len(ids) - 1, 20) and out.n_positions == sum(
        len(encode_rationale(tok, cfg.teacher, r, NO_CUT).ids) - 1 for r in rows)
    assert (stored_ids == top.indices[:-1].numpy()).all()
    assert np.allclose(stored_lp, top.values[:-1].numpy(), atol=1e-2)     # float16 on disk
    assert out.bytes_per_position <= 130, out.bytes_per_position
    # how sure the teacher is on the supervised tokens, by hand from the full softmax restricted to its top-20
    ent = top1 = n = 0.0
    for r in rows:
        enc = encode_rationale(tok, cfg.teacher, r, NO_CUT)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([enc.ids])).logits.float()[0], dim=-1)
        first = next(j for j, y in enumerate(enc.labels) if y >= 0)
        t = lp.topk(20, dim=-1).values[first - 1:-1]
        p = torch.softmax(t, dim=-1)
        ent, top1, n = ent + float(-(p * p.log()).sum()), top1 + float(t[:, 0].exp().sum()), n + len(t)
    assert out.mean_entropy == pytest.approx(ent / n, rel=1e-2) and out.mean_top1_prob == pytest.approx(top1 / n, rel=1e-2)


def test_a_rerun_scores_nothing_more_data_scores_only_the_new_and_a_kill_keeps_the_finished_parts(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=40)
    cfg = scoring(cfg, st.model_dir, k=4, commit_every=8)
    first = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
    assert first.n_scored == 40
    assert TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st)) == first   # cached
    # +10% data: the same 40 problems and 4 new ones (same generator seed); the student as before
    bigger = cfg.data.train.model_copy(update={"n": 44})
    gen44 = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, bigger))
    more = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen44, student=st))
    assert more.n_sequences == 44 and more.n_scored == 4
    # a kill in the third part: the two finished parts stay, a rerun scores only the rest
    import tasks.teacher_scores as stage
    real, calls = stage.top_k_scores, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    killed = scoring(cfg, st.model_dir, k=5, commit_every=8)
    monkeypatch.setattr(stage, "top_k_scores", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        TEACHER_SCORES.run(ws, killed, TeacherScoresInputs(generation=gen, student=st))
    monkeypatch.setattr(stage, "top_k_scores", real)
    resumed = TEACHER_SCORES.run(ws, killed, TeacherScoresInputs(generation=gen, student=st))
    assert resumed.n_scored == 40 - 16 and resumed.n_sequences == 40
    assert scorer_fingerprint(killed.teacher_scores) != scorer_fingerprint(cfg.teacher_scores)   # k is in it


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(tmp_path):
    ws = Workspace(tmp_path / "a")
    cfg, cat, gen, st = prepared(ws, n=16)
    _, _, _, other = prepared(Workspace(tmp_path / "b"), n=48)    # its BPE trained on another corpus
    with pytest.raises(ValueError, match=r"teacher_scores.model.*teacher's tokenizer.*student's.*share one"):
        TEACHER_SCORES.run(ws, scoring(cfg, other.model_dir), TeacherScoresInputs(generation=gen, student=st))
    # before any work, where the student's tokenizer is known (a student folder): one line naming both
    from flows.preflight import preflight
    from keystep.config import ConfigError
    pretrained = scoring(cfg, other.model_dir).model_copy(update={"student": cfg.student.model_copy(
        update={"model": st.model_dir})})
    with pytest.raises(ConfigError, match=f"teacher's tokenizer \\({other.model_dir}.*the student's \\({st.model_dir}"):
        preflight(pretrained, check_teacher_endpoint=False)
    preflight(scoring(pretrained, st.model_dir), check_teacher_endpoint=False)     # the same tokenizer: no error


def test_vllm_engine_scores_through_prompt_logprobs_retrying_faults_and_paying_each_sequence_once(tmp_path):
    """engine vllm against a real HTTP server speaking vLLM's prompt_logprobs, 20% of whose requests fail once
    (500): every sequence ends up scored with the server's top k, each paid for once, and a rerun asks nothing."""
    from tests.fake_openai import FakeOpenAI, fake_prompt_logprobs
    from tasks.teacher_scores import parse_prompt_logprobs

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=30)
    with FakeOpenAI(faults={"500": 0.2}) as server:
        cfg = scoring(cfg, st.model_dir, k=5, engine="vllm", server_url=server.base_url, commit_every=8)
        out = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
        assert out.n_sequences == out.n_scored == 30
        assert sum(server.attempts.values()) > 30                 # faults happened and were retried ...
        assert set(server.served.values()) == {1} and len(server.served) == 30   # ... each sequence paid once
        requests = server.requests
        TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
        assert server.requests == requests                          # a rerun asks nothing
    _, tok = load_student(st.model_dir)
    ids = encode_rationale(tok, cfg.teacher, kept_rationales(cat, cfg, gen)[0], NO_CUT).ids
    want = parse_prompt_logprobs(fake_prompt_logprobs(ids, 5), len(ids), 5)
    got = load_scores(ws, out, [sequence_hash(ids)])[sequence_hash(ids)]
    assert (got[0] == want[0]).all() and np.allclose(got[1], want[1])
    assert (want[0][0] == [(ids[0] * 7 + r) % 1000 for r in range(5)]).all()     # the top k, not the prompt's token
    assert scorer_fingerprint(cfg.teacher_scores) != scorer_fingerprint(
        cfg.teacher_scores.model_copy(update={"engine": "local"}))             # another engine: other numbers


def test_vllm_engine_bad_endpoints_are_one_line_naming_the_fix(tmp_path):
    from tests.fake_openai import FakeOpenAI

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=8)
    with FakeOpenAI(max_logprobs=4) as capped:
        with pytest.raises(ValueError, match=r"teacher_scores.k.*--max-logprobs 5"):
            TEACHER_SCORES.run(ws, scoring(cfg, st.model_dir, k=5, engine="vllm", server_url=capped.base_url),
                               TeacherScoresInputs(generation=gen, student=st))
    with FakeOpenAI(prompt_logprobs=False) as plain:
        with pytest.raises(ValueError, match=r"returned no prompt_logprobs.*engine: local"):
            TEACHER_SCORES.run(ws, scoring(cfg, st.model_dir, k=3, engine="vllm", server_url=plain.base_url),
                               TeacherScoresInputs(generation=gen, student=st))
    assert not ws.catalog().execute("select * from teacher_scores")        # nothing half-stored


def test_sequences_the_same_teacher_generated_with_logprobs_are_not_scored_again(tmp_path, monkeypatch):
    """Never paid twice: a vLLM teacher serving the scorer's folder with teacher.logprobs ≥ k already gave the top-k
    at every position the loss reads (its generated ids are the sequence's tokens after the prompt); the stage takes
    them instead of scoring — the engine never starts — and fills only the prompt rows, which no loss reads, with
    zeros. With more than it captured (k above teacher.logprobs) it scores as before."""
    import tasks.teacher_scores as stage
    from tasks.training import kd_loss_sum

    ws = Workspace(tmp_path)
    cfg, cat, _, st = prepared(ws, n=24)
    model, tok = load_student(st.model_dir)
    cfg, gen = generated_with_logprobs(ws, cfg, st.model_dir, tok)
    assert gen.n_correct == 24 and gen.logprob_tokens > 0

    def no_engine(*args, **kwargs):
        raise AssertionError("the scorer was started")
    monkeypatch.setattr(stage, "scorer", no_engine)
    out = TEACHER_SCORES.run(ws, scoring(cfg, st.model_dir, k=4), TeacherScoresInputs(generation=gen, student=st))
    assert out.n_reused == out.n_sequences == 24 and out.n_scored == 0 and out.captured_fp
    assert out.captured_fp != out.scorer_fp and out.mean_entropy is not None
    rows = kept_rationales(cat, cfg, gen)
    seq = encode_rationale(tok, cfg.teacher, rows[0], NO_CUT)
    ids, lp = load_scores(ws, out, [sequence_hash(seq.ids)])[sequence_hash(seq.ids)]
    first = next(j for j, y in enumerate(seq.labels) if y >= 0)     # the first token the loss reads
    assert ids.shape == (len(seq.ids) - 1, 4)
    # row j: the distribution of token j + 1 — the token itself first (−0.1), as the server sent it, then 3 others
    assert (ids[first - 1:, 0] == seq.ids[first:]).all() and np.allclose(lp[first - 1:], [-0.1, -2, -3, -4], atol=2e-3)
    assert not ids[:first - 1].any() and not lp[:first - 1].any()   # the prompt's rows: zeros, as row 0 in training
    # kd trains on them: the prompt's zero rows carry no loss
    topk = stage.teacher_topk(ws, scoring(cfg, st.model_dir, k=4), tok, rows, out)[rows[0]["rationale_id"]]
    batch = {"ids": torch.tensor([seq.ids]), "labels": torch.tensor([seq.labels])}
    logits = model(input_ids=batch["ids"]).logits
    loss = kd_loss_sum(logits, batch["labels"], torch.ones_like(batch["ids"], dtype=torch.float),
                       torch.tensor(topk[0])[None], torch.tensor(topk[1])[None], 0.5, 1.0)
    assert torch.isfinite(loss) and loss > 0
    assert TEACHER_SCORES.run(ws, scoring(cfg, st.model_dir, k=4), TeacherScoresInputs(generation=gen, student=st)) == out
    # k = 6 is more than the 5 captured: scored by the engine
    monkeypatch.undo()
    more = TEACHER_SCORES.run(ws, scoring(cfg, st.model_dir, k=6), TeacherScoresInputs(generation=gen, student=st))
    assert more.n_scored == 24 and more.n_reused == 0 and more.captured_fp is None


def generated_with_logprobs(ws, cfg, teacher_dir, tok):
    """(config, generation): the dataset's correct rationales from a vLLM-protocol server for the folder `teacher_dir`,
    with teacher.logprobs 5 (the server's ids: `tok`'s tokens of each answer text)."""
    from keystep.config import teacher_config
    from tests.fake_openai import FakeOpenAI

    dataset = ingest.ingest(ws, cfg.data.train)
    answers = {e["question"]: e["answer"] for e in ws.catalog().query("examples_of_dataset", dataset_fp=dataset.fp)}
    cfg = cfg.model_copy(update={"teacher": teacher_config(**{
        **cfg.teacher.model_dump(), "backend": "vllm", "model": teacher_dir, "logprobs": 5, "concurrency": 4})})
    with FakeOpenAI(answers=answers, tokenizer=tok) as server:
        return cfg, teacher.generate_rationales(ws, cfg, dataset, endpoint=server.base_url)


def test_a_teacher_folder_that_does_not_add_bos_is_scored_not_taken_from_generation(tmp_path):
    """vLLM tokenizes the prompt text with the teacher folder's tokenizer: one that does not add <bos> itself generated
    after other tokens than keystep's `<bos> prompt` sequences hold, so its captured distributions are not theirs."""
    import shutil

    from transformers import AutoTokenizer

    ws = Workspace(tmp_path / "ws")
    cfg, cat, _, st = prepared(ws, n=8)
    no_bos = tmp_path / "no-bos"
    shutil.copytree(st.model_dir, no_bos)
    plain = AutoTokenizer.from_pretrained(no_bos)
    plain.add_bos_token = False
    plain.save_pretrained(no_bos)
    assert AutoTokenizer.from_pretrained(no_bos)("0").input_ids[:1] != [plain.bos_token_id]
    cfg, gen = generated_with_logprobs(ws, cfg, str(no_bos), load_student(st.model_dir)[1])   # the same ids as served
    assert gen.n_correct == 8
    out = TEACHER_SCORES.run(ws, scoring(cfg, str(no_bos), k=4), TeacherScoresInputs(generation=gen, student=st))
    assert out.n_reused == 0 and out.n_scored == out.n_sequences == 8


def test_any_token_sequences_go_through_the_scorer_once(tmp_path):
    """`score_missing`: sequences that are no stored rationale (a student's own samples, say) are scored by the same
    scorer and cache — the forward pass's top-k, each sequence once."""
    from tasks.teacher_scores import TeacherScores, score_missing

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=8)
    cfg = scoring(cfg, st.model_dir, k=3)
    model, tok = load_student(st.model_dir)
    rng = np.random.default_rng(0)
    seqs = {sequence_hash(ids): ids for ids in ([int(x) for x in rng.integers(3, len(tok), size=n)] for n in (5, 9, 17))}
    assert sorted(score_missing(ws, cfg.teacher_scores, "cpu", seqs, len(tok))) == sorted(seqs)
    assert score_missing(ws, cfg.teacher_scores, "cpu", seqs, len(tok)) == []          # stored: nothing scored again
    held = TeacherScores(fp="-", scorer_fp=scorer_fingerprint(cfg.teacher_scores), k=3, scores_dir=str(tmp_path),
                         n_sequences=3, n_scored=3, n_positions=28, bytes_per_position=0.0)
    got = load_scores(ws, held, list(seqs))
    for h, ids in seqs.items():
        with torch.no_grad():
            top = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.float()[0], dim=-1).topk(3, dim=-1)
        assert (got[h][0] == top.indices[:-1].numpy()).all() and np.allclose(got[h][1], top.values[:-1].numpy(), atol=1e-2)
