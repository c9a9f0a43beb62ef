import random

import pytest
import torch

from keystep.config import MasksConfig
from storage.workspace import Workspace
from tasks.keypoints import (build_modules, encode_rationales, gumbel_sigmoid, infer_weights, keypoints,
                             learn_token_weights, load_weights, mask_losses, weights_fingerprint)
from tasks.steps import split_rationales, steps_fingerprint
from tests.tasks.helpers import prepared

CFG = MasksConfig(epochs=1, batch_size=8, predictor_hidden=32, predictor_layers=1, mlp_hidden=16, attention_heads=2)


def setup(tmp_path, n=16):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=n, **{"student.max_length": 256})
    sfp = steps_fingerprint(cfg.steps, gen["fingerprint"], st["student_fp"])
    split_rationales(cat, cfg.steps, cfg.teacher, gen, st["model_dir"], sfp)
    from tasks.student import load_student
    model, tok = load_student(st["model_dir"])
    steps = {}
    for s in cat.query("steps_of_rationales", steps_fp=sfp):
        steps.setdefault(s["rationale_id"], []).append(s)
    rows = cat.query("kept_rationales", dataset_fp=gen["dataset_fp"], teacher_fp=gen["teacher_fp"], only_correct=True)
    items = encode_rationales(tok, cfg.teacher, rows, steps, cfg.student.max_length)
    assert len(items) == n  # every kept rationale fits
    return ws, cfg, cat, gen, st, sfp, model, tok, items


def test_rationale_excludes_the_answer_sentence(tmp_path):
    *_, tok, items = setup(tmp_path)
    for it in items:
        rationale = tok.decode(it.ids[it.rationale_start:it.rationale_end])
        after = tok.decode(it.ids[it.rationale_end:], skip_special_tokens=True)
        assert "answer is" not in rationale and after.strip().startswith("Therefore, the answer is")
        assert it.step_ends[-1] == it.rationale_end and all(a < b for a, b in zip(it.step_ends, it.step_ends[1:]))


@pytest.mark.parametrize("predictor", ["student", "scratch"])
def test_lp_gradient_reaches_the_mlp_and_the_attention_layer(tmp_path, predictor):
    ws, cfg, cat, gen, st, sfp, model, tok, items = setup(tmp_path)
    torch.manual_seed(0)
    weighter, predictor = build_modules(CFG.model_copy(update={"predictor": predictor}), model.get_input_embeddings(),
                                        tok, predictor_dir=st["model_dir"])
    _, lp, _ = mask_losses(weighter, predictor, items[:4], CFG, tok.pad_token_id, random.Random(0))
    lp.backward()  # the answer loss alone, no mask penalty
    for name, p in [("mlp.0", weighter.mlp[0].weight), ("mlp.2", weighter.mlp[2].weight),
                    ("attention", weighter.att.in_proj_weight), ("e_mask", weighter.e_mask)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert weighter.emb.weight.grad is None  # the student's embeddings stay frozen


def test_gumbel_sigmoid_is_hard_forward_soft_backward():
    logits = torch.tensor([3.0, -3.0, 0.0], requires_grad=True)
    torch.manual_seed(0)
    m = gumbel_sigmoid(logits, tau=0.5)
    assert set(m.tolist()) <= {0.0, 1.0}
    m.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_keypoints_are_top_k_in_text_order():
    assert keypoints([0.1, 0.9, 0.5, 0.8], 2) == [1, 3]


def test_stage_stores_one_weight_per_rationale_token_and_uniform_switch(tmp_path):
    ws, cfg, cat, gen, st, sfp, model, tok, items = setup(tmp_path)
    fp = weights_fingerprint(CFG, sfp, st["student_fp"])
    s = learn_token_weights(cat, CFG, cfg.teacher, gen, sfp, st, cfg.student.max_length, fp)
    stored = load_weights(cat, fp)
    assert s["n_rationales"] == len(items) == len(stored)
    for it in items:
        start, w = stored[it.rationale_id]
        assert start == it.rationale_start and len(w) == it.rationale_end - it.rationale_start
        assert all(0.0 <= x <= 1.0 for x in w)
    uni = CFG.model_copy(update={"uniform": True})
    ufp = weights_fingerprint(uni, sfp, st["student_fp"])
    assert ufp != fp
    learn_token_weights(cat, uni, cfg.teacher, gen, sfp, st, cfg.student.max_length, ufp)
    assert all(set(w) == {1.0} for _, w in load_weights(cat, ufp).values())
    assert not s["collapsed"]     # the weighter's own (low) learning rate keeps masks open
    hard = CFG.model_copy(update={"alpha": 50.0, "weighter_lr": 0.05, "epochs": 2})
    hfp = weights_fingerprint(hard, sfp, st["student_fp"])
    collapsed = learn_token_weights(cat, hard, cfg.teacher, gen, sfp, st, cfg.student.max_length, hfp)
    assert collapsed["collapsed"] and collapsed["kept_fraction"] < 0.05   # reported, not silent


def test_inference_is_deterministic(tmp_path):
    ws, cfg, cat, gen, st, sfp, model, tok, items = setup(tmp_path)
    weighter, _ = build_modules(CFG, model.get_input_embeddings(), tok, predictor_dir=st["model_dir"])
    a = infer_weights(weighter, items, tok.pad_token_id)
    b = infer_weights(weighter, items, tok.pad_token_id, batch_size=3)  # other padding, same weights
    assert all(x == pytest.approx(y, abs=1e-5) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_student_predictor_is_the_warmed_up_student_shared_with_difficulty(tmp_path):
    from keystep.config import DifficultyConfig
    from tasks.difficulty import difficulty_fingerprint, score_difficulty

    ws, cfg, cat, gen, st, sfp, model, tok, items = setup(tmp_path)
    mcfg = CFG.model_copy(update={"predictor_warmup_epochs": 2})
    wfp = weights_fingerprint(mcfg, sfp, st["student_fp"])
    learn_token_weights(cat, mcfg, cfg.teacher, gen, sfp, st, cfg.student.max_length, wfp)
    dcfg = DifficultyConfig(warmup_epochs=2)
    d = score_difficulty(cat, dcfg, cfg.teacher, gen, sfp, wfp, st, True, cfg.student.max_length,
                         difficulty_fingerprint(dcfg, wfp, st["student_fp"]))
    warmups = [p for p in ws.root.joinpath("checkpoints").iterdir()]
    assert len(warmups) == 1 and d["scoring_model"] == str(warmups[0] / "epoch-2")   # trained once, read by both
