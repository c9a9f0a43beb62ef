"""Logit distillation (`train.loss: kd`): the loss against a hand computation, its top-k rows travelling with their
tokens through packing, and a training run on a teacher's stored scores."""
import math

import numpy as np
import pytest
import torch

from storage.workspace import Workspace
from tasks.formats import IGNORE, Sequence
from tasks.packing import collate, collate_packed
from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs
from tasks.train import TRAIN, TrainInputs, train_lineage
from tasks.training import kd_loss_sum, weighted_nll_sum
from tests.tasks.helpers import prepared


def test_kd_loss_is_the_mixture_of_nll_and_the_kl_to_the_renormalised_top_k_by_hand():
    # one predicted token (position 1), vocabulary 3, teacher top-2 = tokens 0 and 2
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 0]])
    weights = torch.ones(1, 2)
    t_ids = torch.tensor([[[0, 0], [0, 2]]])
    t_lp = torch.tensor([[[0.0, 0.0], [math.log(0.6), math.log(0.2)]]])
    alpha, tau = 0.25, 2.0
    s = [1.0, 0.0, -1.0]
    log_z = math.log(sum(math.exp(v) for v in s))
    nll = -(s[0] - log_z)
    p_t = [0.6 ** (1 / tau) / (0.6 ** (1 / tau) + 0.2 ** (1 / tau)), 0.2 ** (1 / tau) / (0.6 ** (1 / tau) + 0.2 ** (1 / tau))]
    log_z_tau = math.log(sum(math.exp(v / tau) for v in s))
    log_q = [s[0] / tau - log_z_tau, s[2] / tau - log_z_tau]
    kl = sum(p * (math.log(p) - q) for p, q in zip(p_t, log_q))
    expected = (1 - alpha) * nll + alpha * tau ** 2 * kl
    got = kd_loss_sum(logits, labels, weights, t_ids, t_lp, alpha, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # α = 0 is the plain NLL, exactly
    assert kd_loss_sum(logits, labels, weights, t_ids, t_lp, 0.0, tau).item() == \
        pytest.approx(weighted_nll_sum(logits, labels, weights).item(), rel=1e-6)


def test_packed_kd_loss_equals_padded_kd_loss():
    rng = np.random.default_rng(0)
    vocab, k = 11, 3
    seqs = []
    for n in (5, 3, 7, 4):
        ids = rng.integers(3, vocab, n).tolist()
        labels = [IGNORE, IGNORE] + ids[2:]
        topk = (rng.integers(0, vocab, (n, k)).astype(np.int64), np.log(rng.dirichlet(np.ones(k), n)).astype(np.float32))
        seqs.append(Sequence(ids, labels, [(0, 0)] * n, n, teacher_topk=topk))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))

    def loss(batch):
        return kd_loss_sum(model(batch["input_ids"]), batch["labels"], batch["weights"], batch["teacher_ids"],
                           batch["teacher_logprobs"], 0.5, 2.0)

    padded, packed = collate(seqs, 0), collate_packed(seqs, 0, row_length=10)
    assert packed["input_ids"].shape[0] < len(seqs)      # it did pack
    assert loss(packed).item() == pytest.approx(loss(padded).item(), rel=1e-5)


def test_kd_trains_on_the_teachers_stored_scores_and_its_lineage_names_them(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=24)
    kd = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"loss": "kd", "kd": cfg.train.kd.model_copy(update={"alpha": 0.5})}),
        "teacher_scores": cfg.teacher_scores.model_copy(update={"model": st.model_dir, "k": 8})})
    scores = TEACHER_SCORES.run(ws, kd, TeacherScoresInputs(generation=gen, student=st))
    inputs = TrainInputs(generation=gen, student=st, teacher_scores=scores)
    out = TRAIN.run(ws, kd, inputs)
    assert out.loss == "kd" and all(math.isfinite(h["loss"]) for h in out.history)
    assert scores.fp in train_lineage(kd, inputs).upstream
    assert scores.fp not in train_lineage(cfg, inputs).upstream     # Std-CoT does not read them
    # `keystep results` says what the latest evaluation evaluated: this kd run, with its teacher distributions
    from storage.fingerprint import Lineage
    from tasks.evaluate import trained_description
    with cat.transaction() as con:
        cat.record_stage(con, Lineage("evaluate", {}, (out.fp, st.fp), "test"))
    said = trained_description(ws.catalog())
    assert said["loss"] == "kd" and said["teacher distributions"].startswith("top-8 of ")
    assert "KL weight α 0.5" in said["teacher distributions"]
    # the run's summary artifact adds the stage's figures: what was scored, what was reused, how sure the teacher is
    from tasks.evaluate import teacher_distributions
    header = teacher_distributions(kd, scores)
    assert "24 sequences (24 scored by this run, 0 from the teacher's logprobs while generating)" in header
    assert f"mean entropy {scores.mean_entropy:.3f} nats, top-1 probability {scores.mean_top1_prob:.3f}" in header
    with pytest.raises(ValueError, match="teacher_scores.model"):
        type(kd).model_validate({**kd.model_dump(), "teacher_scores": {"model": None}})


def test_token_weights_multiply_each_tokens_nll_and_kl():
    """kpod_kd: a token's learned weight scales its whole kd term, the KL to the teacher as well as the NLL."""
    rng = np.random.default_rng(1)
    vocab, k, n = 7, 3, 5
    logits = torch.tensor(rng.normal(size=(1, n, vocab)), dtype=torch.float32)
    labels = torch.tensor([[IGNORE, *rng.integers(0, vocab, n - 1)]])
    t_ids = torch.tensor(rng.integers(0, vocab, (1, n, k)))
    t_lp = torch.tensor(np.log(rng.dirichlet(np.ones(k), (1, n))), dtype=torch.float32)
    w = torch.tensor([[1.0, 0.2, 0.9, 0.0, 0.5]])
    alone = []
    for j in range(1, n):      # each token's term on its own, with weight 1
        only = torch.full_like(labels, IGNORE)
        only[0, j] = labels[0, j]
        alone.append(kd_loss_sum(logits, only, torch.ones_like(w), t_ids, t_lp, 1.0, 1.5).item())
    # α = 1: the loss is the KL alone, so this checks that the weights reach it
    assert kd_loss_sum(logits, labels, w, t_ids, t_lp, 1.0, 1.5).item() == \
        pytest.approx(sum(w[0, j].item() * alone[j - 1] for j in range(1, n)), rel=1e-5)


def test_kpod_kd_trains_through_the_curriculum_on_the_teachers_scores(tmp_path):
    from tests.tasks.helpers import kpod_prepared
    from tasks.training import setup

    ws = Workspace(tmp_path)
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=24, epochs=3)
    both = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"loss": "kpod_kd"}),
        "teacher_scores": cfg.teacher_scores.model_copy(update={"model": st.model_dir, "k": 8})})
    both = type(both).model_validate(both.model_dump())      # the config as a user would write it
    assert both.needs_token_weights and both.needs_curriculum
    scores = TEACHER_SCORES.run(ws, both, TeacherScoresInputs(generation=gen, student=st))
    inputs = TrainInputs(generation=gen, student=st, teacher_scores=scores, **kpod)
    upstream = train_lineage(both, inputs).upstream
    assert scores.fp in upstream and kpod["token_weights"].fp in upstream and kpod["curriculum"].fp in upstream
    # every curriculum stage's sequences carry the teacher's rows for their own tokens, and KPOD's weights
    run = setup(ws, train_lineage(both, inputs), both, inputs)
    for epoch in (1, run.staged.stages + 1):
        seqs = run.staged.sequences(epoch)
        assert all(s.teacher_topk[0].shape == (len(s.ids), 8) and s.weights is not None for s in seqs)
    assert any(w < 1 for s in run.staged.sequences(1) for w in s.weights)
    out = TRAIN.run(ws, both, inputs)
    assert out.loss == "kpod_kd" and all(math.isfinite(h["loss"]) for h in out.history)
    with pytest.raises(ValueError, match="teacher_scores.model"):
        type(both).model_validate({**both.model_dump(), "teacher_scores": {"model": None}})


def kd_config(cfg, st, k=6, **train):
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"loss": "kd", **train}),
        "teacher_scores": cfg.teacher_scores.model_copy(update={"model": st.model_dir, "k": k})})


def test_kd_under_two_processes_gives_the_one_process_loss(tmp_path):
    """The top-k rows reach every rank with its share of the batch (DDP, gloo on the CPU), as the labels do."""
    history = {}
    for n in (1, 2):
        ws = Workspace(tmp_path / f"p{n}")
        cfg, cat, gen, st = prepared(ws, n=28, **{"train.epochs": 2, "train.batch_size": 7, "train.num_processes": n})
        kd = kd_config(cfg, st, num_processes=n)
        scores = TEACHER_SCORES.run(ws, kd, TeacherScoresInputs(generation=gen, student=st))
        history[n] = [h["loss"] for h in TRAIN.run(ws, kd, TrainInputs(generation=gen, student=st,
                                                                       teacher_scores=scores)).history]
    assert history[2] == pytest.approx(history[1], rel=1e-4)


def test_kd_trains_a_lora_student(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=24, **{"train.epochs": 2, "student.lora": {"r": 4, "alpha": 8},
                                              "train.lr": 0.01})
    kd = kd_config(cfg, st)
    scores = TEACHER_SCORES.run(ws, kd, TeacherScoresInputs(generation=gen, student=st))
    out = TRAIN.run(ws, kd, TrainInputs(generation=gen, student=st, teacher_scores=scores))
    assert out.final_dir.endswith("merged") and out.history[-1]["loss"] < out.history[0]["loss"]
