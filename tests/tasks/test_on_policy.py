"""On-policy distillation (train.loss: on_policy): the divergence by hand, λ = 0 as the off-policy loss, a kill
resumed to the same weights, and a failing teacher endpoint that loses nothing and is paid once per sample."""
import math

import numpy as np
import pytest
import torch

from storage.workspace import Workspace
from tasks import on_policy, teacher_scores
from tasks.formats import IGNORE, encode_rationale
from tasks.on_policy import generalized_jsd_sum
from tasks.packing import collate
from tasks.stage import kept_rationales
from tasks.student import load_student
from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs, teacher_topk
from tasks.train import TRAIN, TrainInputs
from tests.tasks.helpers import prepared


def toy(student_p, teacher_p):
    """One labelled token: the student's full distribution over 4 tokens, the teacher's top-2 (ids 0 and 1)."""
    logits = torch.log(torch.tensor([[student_p, [0.25] * 4]]))    # position 0's logits predict token 1 ...
    labels = torch.tensor([[IGNORE, 1]])
    ids = torch.tensor([[[0, 0], [0, 1]]])                          # ... whose teacher row is row 1
    lps = torch.log(torch.tensor([[[1.0, 1.0], teacher_p]]))
    return logits, labels, torch.ones(1, 2), ids, lps


def test_the_divergence_over_the_teachers_top_k_and_a_tail_bucket_by_hand():
    # student p_S = (.5, .25, .125, .125): on the buckets (token 0, token 1, the rest) (.5, .25, .25);
    # teacher top-2 (.6, .3): buckets (.6, .3, .1)
    args = toy([0.5, 0.25, 0.125, 0.125], [0.6, 0.3])
    reverse = 0.5 * math.log(0.5 / 0.6) + 0.25 * math.log(0.25 / 0.3) + 0.25 * math.log(0.25 / 0.1)
    forward = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.1 * math.log(0.1 / 0.25)
    assert reverse == pytest.approx(0.0923315, abs=1e-6)
    assert generalized_jsd_sum(*args, beta=1.0).item() == pytest.approx(reverse, rel=1e-5)
    assert generalized_jsd_sum(*args, beta=0.0).item() == pytest.approx(forward, rel=1e-5)
    s, t = [0.5, 0.25, 0.25], [0.6, 0.3, 0.1]
    m = [0.5 * a + 0.5 * b for a, b in zip(s, t)]
    jsd = 0.5 * sum(b * math.log(b / c) for b, c in zip(t, m)) + 0.5 * sum(a * math.log(a / c) for a, c in zip(s, m))
    assert generalized_jsd_sum(*args, beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    # the same distribution on both sides: 0; the token's weight multiplies it; an unlabelled token adds nothing
    assert generalized_jsd_sum(*toy([0.6, 0.3, 0.05, 0.05], [0.6, 0.3]), beta=1.0).item() == pytest.approx(0, abs=1e-6)
    logits, labels, w, ids, lps = args
    assert generalized_jsd_sum(logits, labels, w * 0.5, ids, lps, 1.0).item() == pytest.approx(reverse / 2, rel=1e-5)
    assert generalized_jsd_sum(logits, torch.tensor([[IGNORE, IGNORE]]), w, ids, lps, 1.0).item() == 0


def teacher_folder(st, path):
    """A teacher with the student's tokenizer and other weights: the untrained student, each weight moved by noise."""
    model, tok = load_student(st.model_dir)
    torch.manual_seed(7)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def on_policy_config(cfg, teacher_dir, **settings):
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"loss": "on_policy", "on_policy": cfg.train.on_policy.model_copy(
            update={"max_new_tokens": 24, **settings})}),
        "teacher_scores": cfg.teacher_scores.model_copy(update={"model": teacher_dir, "k": 8})})


def scored(ws, cfg, gen, st):
    scores = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
    return TrainInputs(generation=gen, student=st, teacher_scores=scores)


def test_lmbda_0_is_the_divergence_on_the_teachers_text_and_samples_nothing(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"train.batch_size": 16, "train.epochs": 1})
    op = on_policy_config(cfg, teacher_folder(st, tmp_path / "teacher"), lmbda=0.0)
    inputs = scored(ws, op, gen, st)

    def never(*args, **kwargs):
        raise AssertionError("λ = 0 samples and scores nothing")
    monkeypatch.setattr(on_policy, "sample_completions", never)
    monkeypatch.setattr(on_policy, "scorer", never)
    out = TRAIN.run(ws, op, inputs)
    (epoch,) = out.history
    assert epoch["on_policy_share"] == 0 and epoch["samples"] == 0 and epoch["sample_accuracy"] is None
    # one step per epoch: its loss is the JSD to the teacher's stored top-k on its own text, at the initial weights
    model, tok = load_student(st.model_dir)
    rows = kept_rationales(cat, op, gen)
    topk = teacher_topk(ws, op, tok, rows, inputs.teacher_scores)
    seqs = [encode_rationale(tok, op.teacher, r, op.student.max_length) for r in rows]
    for s, r in zip(seqs, rows):
        s.teacher_topk = topk[r["rationale_id"]]
    batch = collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = generalized_jsd_sum(logits, batch["labels"], batch["weights"], batch["teacher_ids"],
                               batch["teacher_logprobs"], 1.0) / sum(s.supervised for s in seqs)
    assert want.item() > 0.1 and epoch["loss"] == pytest.approx(want.item(), rel=1e-4)


def test_sft_epochs_train_as_std_cot_then_sample(tmp_path, monkeypatch):
    """train.on_policy.sft_epochs: those epochs are Std-CoT to the weight (the NLL on the teacher's text, nothing
    sampled or scored), the epochs after them on-policy."""
    settings = {"train.batch_size": 8, "train.epochs": 2, "train.precision": "fp32"}
    ws_a, ws_b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    cfg_a, _, gen_a, st_a = prepared(ws_a, n=16, **settings)
    op = on_policy_config(cfg_a, teacher_folder(st_a, tmp_path / "teacher"), lmbda=1.0, sft_epochs=1)
    sampled_in: list[int] = []
    real_sequences = on_policy.OnPolicy.sequences

    def recording(self, model, group, epoch, step):
        sampled_in.append(epoch)
        return real_sequences(self, model, group, epoch, step)
    monkeypatch.setattr(on_policy.OnPolicy, "sequences", recording)
    out = TRAIN.run(ws_a, op, scored(ws_a, op, gen_a, st_a))
    assert set(sampled_in) == {2} and [h["on_policy_share"] for h in out.history] == [0.0, 1.0]
    cfg_b, _, gen_b, st_b = prepared(ws_b, n=16, **settings)         # the same run with loss std_cot
    std = TRAIN.run(ws_b, cfg_b, TrainInputs(generation=gen_b, student=st_b))
    assert out.history[0]["loss"] == pytest.approx(std.history[0]["loss"], rel=1e-6)
    a, _ = load_student(ws_a.checkpoints_root(out.fp) / "epoch-1")
    b, _ = load_student(ws_b.checkpoints_root(std.fp) / "epoch-1")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_sft_epochs_must_leave_an_on_policy_epoch():
    from keystep.config import TrainConfig
    with pytest.raises(ValueError, match=r"train.on_policy.sft_epochs \(3\) leaves no on-policy epoch of train.epochs \(3\)"):
        TrainConfig(loss="on_policy", epochs=3, on_policy={"sft_epochs": 3})


def test_a_kill_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run_paying_no_sample_twice(tmp_path, monkeypatch):
    settings = {"train.batch_size": 8, "train.epochs": 2, "train.precision": "fp32"}
    ws_a, ws_b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    cfg_a, _, gen_a, st_a = prepared(ws_a, n=16, **settings)
    teacher_dir = teacher_folder(st_a, tmp_path / "teacher")
    op_a = on_policy_config(cfg_a, teacher_dir, lmbda=1.0)
    whole = TRAIN.run(ws_a, op_a, scored(ws_a, op_a, gen_a, st_a))
    assert [h["on_policy_share"] for h in whole.history] == [1.0, 1.0] and whole.history[0]["samples"] == 16
    assert 0 <= whole.history[0]["sample_accuracy"] <= 1 and whole.history[0]["reverse_kl"] > 0

    cfg_b, _, gen_b, st_b = prepared(ws_b, n=16, **settings)
    op_b = on_policy_config(cfg_b, teacher_dir, lmbda=1.0)    # the same teacher folder: the same scorer
    inputs = scored(ws_b, op_b, gen_b, st_b)
    scored_now: list[list[str]] = []
    real_score_missing = teacher_scores.score_missing

    def counting(*args, **kwargs):
        scored_now.append(real_score_missing(*args, **kwargs))
        return scored_now[-1]
    monkeypatch.setattr(on_policy, "score_missing", counting)
    real_sequences = on_policy.OnPolicy.sequences

    def killed_at_epoch_2_step_1(self, model, group, epoch, step):
        if (epoch, step) == (2, 1):
            raise KeyboardInterrupt("killed")
        return real_sequences(self, model, group, epoch, step)
    monkeypatch.setattr(on_policy.OnPolicy, "sequences", killed_at_epoch_2_step_1)
    with pytest.raises(KeyboardInterrupt):
        TRAIN.run(ws_b, op_b, inputs)
    paid_before = [h for batch in scored_now for h in batch]
    assert len(scored_now) == 3 and all(scored_now)       # epoch 1's two steps, epoch 2's first
    monkeypatch.setattr(on_policy.OnPolicy, "sequences", real_sequences)
    scored_now.clear()
    resumed = TRAIN.run(ws_b, op_b, inputs)
    assert resumed.resumed_from_epoch == 1
    assert scored_now[0] == [] and scored_now[1]           # epoch 2, step 0 was paid before the kill: found
    assert not set(paid_before) & {h for batch in scored_now for h in batch}
    a, _ = load_student(whole.final_dir)
    b, _ = load_student(resumed.final_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # the samples are recorded per epoch and indexed; a finished run's rerun recomputes nothing
    import pyarrow.parquet as pq
    rows = ws_b.catalog().execute("select * from on_policy_samples order by epoch")
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["n_samples"] == 16 for r in rows)
    recorded = pq.read_table(ws_b.root / rows[1]["part"]).to_pylist()
    assert recorded == pq.read_table(ws_a.root / ws_a.catalog().execute(
        "select part from on_policy_samples where epoch = 2")[0]["part"]).to_pylist()
    assert TRAIN.run(ws_b, op_b, inputs) == resumed


def test_a_teacher_endpoint_failing_20_percent_of_scoring_calls_loses_nothing_and_is_paid_once_per_sample(tmp_path):
    from tests.fake_openai import FakeOpenAI

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"train.batch_size": 8, "train.epochs": 1})
    with FakeOpenAI(faults={"500": 0.2}, vocab=len(load_student(st.model_dir)[1])) as server:
        op = on_policy_config(cfg, st.model_dir, lmbda=1.0)
        op = op.model_copy(update={"teacher_scores": op.teacher_scores.model_copy(
            update={"engine": "vllm", "server_url": server.base_url})})
        inputs = scored(ws, op, gen, st)
        out = TRAIN.run(ws, op, inputs)
        assert [h["samples"] for h in out.history] == [16]
        assert sum(server.attempts.values()) > len(server.served)      # faults happened and were retried ...
        assert set(server.served.values()) == {1}                     # ... and every sequence was paid for once
        assert len(server.served) == 16 + len({h for h in _sample_hashes(ws, out.fp)})
        requests = server.requests
        assert TRAIN.run(ws, op, inputs) == out and server.requests == requests    # a rerun asks nothing


def _sample_hashes(ws, train_fp):
    import pyarrow.parquet as pq

    from tasks.teacher_scores import sequence_hash
    hashes = []
    for r in ws.catalog().execute("select part from on_policy_samples where train_fp = ?", [train_fp]):
        for row in pq.read_table(ws.root / r["part"]).to_pylist():
            hashes.append(sequence_hash(np.frombuffer(row["ids"], np.int32).tolist()))
    return hashes


def test_an_endpoint_that_stops_answering_ends_the_task_with_one_line_keeping_the_finished_epochs(tmp_path):
    from tasks.teacher_backends import TeacherUnavailable
    from tests.fake_openai import FakeOpenAI

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"train.batch_size": 8, "train.epochs": 3})
    vocab = len(load_student(st.model_dir)[1])
    with FakeOpenAI(vocab=vocab) as server:
        op = on_policy_config(cfg, st.model_dir, lmbda=1.0)
        op = op.model_copy(update={"teacher_scores": op.teacher_scores.model_copy(
            update={"engine": "vllm", "server_url": server.base_url, "max_retries": 1})})
        inputs = scored(ws, op, gen, st)
        server.die_after = sum(server.served.values()) + 16 + 8     # epoch 1's samples, then half of epoch 2's
        with pytest.raises(TeacherUnavailable) as err:
            TRAIN.run(ws, op, inputs)
    said = str(err.value)
    assert "\n" not in said and "max_retries=1" in said and "epoch 2" in said and "rerun to resume" in said
    assert (ws.checkpoints_root(TRAIN.lineage(op, inputs).fp) / "epoch-1" / "trainer_state.pt").exists()


def test_the_per_epoch_report_has_the_table_and_its_plot(tmp_path):
    history = [{"epoch": e, "loss": 1.0 / e, "on_policy_share": 0.5, "samples": 8, "sample_accuracy": 0.25 * e,
                "reverse_kl": 0.5 / e, "sample_s": 2.0, "score_s": 1.0, "update_s": 3.0} for e in (1, 2)]
    md = on_policy.on_policy_markdown(history, tmp_path)
    assert "| 2 | 0.5000 | 50% | 8 | 50.0% | 0.250 | 2.0 | 1.0 | 3.0 |" in md
    assert (tmp_path / "on-policy.png").stat().st_size > 1000 and "](on-policy.png)" in md
    assert on_policy.epoch_line(history[1]) == ("50% of steps on-policy, 8 samples, 50.0% right, reverse KL 0.250/token; "
                                                "2 s sampling, 1 s scoring, 3 s updating")
