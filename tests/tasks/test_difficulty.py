import math

import pytest

from tasks.difficulty import buckets, DIFFICULTY, DifficultyInputs, step_difficulties, token_nll
from tasks.formats import EncodedRationale
from tasks.token_weights import TOKEN_WEIGHTS, TokenWeightsInputs
from tasks.warmup import warm_up_student
from tests.tasks.helpers import predictor_of
from tests.tasks.test_token_weights import encoded_pipeline


def item(n_tokens=10, start=2, ends=(5, 8)):
    return EncodedRationale("r", list(range(n_tokens)), start, ends[-1], list(ends), "1", [(0, 0)] * n_tokens)


def test_weighted_difficulty_is_softmax_within_step_times_nll():
    it = item()
    nll = [float(j) for j in range(9)]  # nll of token j is at index j-1 -> value j-1
    w = [0.0, 1.0, 0.0, 0.5, 0.5, 0.5]  # rationale tokens 2..7
    (d1, n1), (d2, n2) = step_difficulties(it, nll, w, weighted=True)
    z = math.exp(0) + math.exp(1) + math.exp(0)
    assert n1 == 3 and d1 == pytest.approx((1 * 1 + math.e * 2 + 1 * 3) / z)
    assert n2 == 3 and d2 == pytest.approx((4 + 5 + 6) / 3)  # equal weights: the mean
    (u1, _), _ = step_difficulties(it, nll, w, weighted=False)
    assert u1 == pytest.approx(2.0)  # unweighted ablation: plain mean


def test_buckets_cover_every_item_once_and_respect_the_budget():
    items = [item(n) for n in (12, 40, 8, 33, 20, 9, 50)]
    batches = buckets(items, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(max(len(items[i].ids) for i in b) * len(b) <= 80 or len(b) == 1 for b in batches)


def test_bucketed_scoring_equals_fixed_padding(tmp_path):
    *_, model, tok, items = encoded_pipeline(tmp_path)
    a = token_nll(model, items, 512, "cpu")
    b = token_nll(model, items, 512, "cpu", bucketed=False, fixed_width=max(len(i.ids) for i in items))
    assert all(x == pytest.approx(y, abs=1e-4) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_stage_scores_every_rationale_step(tmp_path):
    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    tw = TOKEN_WEIGHTS.run(ws, cfg, TokenWeightsInputs(
        generation=gen, steps=stp, predictor=predictor_of(ws, cfg, gen, st)))
    s = DIFFICULTY.run(ws, cfg, DifficultyInputs(
        generation=gen, steps=stp, token_weights=tw, scorer=warm_up_student(ws, cfg, gen, st, epochs=1)))
    rows = cat.query("difficulty_of", difficulty_fp=s.fp)
    assert s.n_steps == len(rows) == sum(len([e for e in it.step_ends if e > it.rationale_start]) for it in items)
    assert all(r["difficulty"] > 0 for r in rows)
    assert "warmup" in s.scoring_model or "epoch-1" in s.scoring_model


def test_eq7_temperature_sharpens_toward_the_highest_weighted_token():
    it = item()
    nll = [float(j) for j in range(9)]
    w = [0.0, 1.0, 0.5, 0.5, 0.5, 0.5]       # step 1: tokens 2-4 with NLL 1, 2, 3
    (d1, _), _ = step_difficulties(it, nll, w, weighted=True, temperature=1.0)
    (sharp, _), (flat, _) = step_difficulties(it, nll, w, weighted=True, temperature=0.05)
    assert sharp == pytest.approx(2.0, abs=1e-3) and abs(sharp - 2.0) < abs(d1 - 2.0)   # token 3 (weight 1) dominates
    assert flat == pytest.approx(5.0)                                                      # equal weights: still the mean
