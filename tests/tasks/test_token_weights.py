import random

import pytest
import torch

from storage.workspace import Workspace
from tasks.steps import STEPS, StepsInputs
from tasks.token_weights import (TOKEN_WEIGHTS, TokenWeightsInputs, _batch_ids, gumbel_sigmoid,
                                 infer_weights, keypoints, load_encoded, load_weights, mask_losses)
from tasks.token_weighting import AnswerPredictor, TokenWeighter
from tests.tasks.helpers import MICRO_MASKS, predictor_of, prepared


def build_modules(cfg, embedding, tokenizer, predictor_dir):
    """The weighter and the answer predictor, as tasks.token_weights.train_masks builds them."""
    return TokenWeighter(cfg, embedding), AnswerPredictor(cfg, embedding, tokenizer, predictor_dir)


def encoded_pipeline(tmp_path, n=16):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=n, **{"student.max_length": 256, **MICRO_MASKS})
    stp = STEPS.run(ws, cfg, StepsInputs(generation=gen, student=st))
    from tasks.student import load_student
    model, tok = load_student(st.model_dir)
    _, items = load_encoded(ws, cfg, tok, gen, stp)
    assert len(items) == n  # every kept rationale fits
    return ws, cfg, cat, gen, st, stp, model, tok, items


def with_token_weights(cfg, **update):
    return cfg.model_copy(update={"token_weights": cfg.token_weights.model_copy(update=update)})


def test_rationale_excludes_the_answer_sentence(tmp_path):
    *_, tok, items = encoded_pipeline(tmp_path)
    for it in items:
        rationale = tok.decode(it.ids[it.rationale_start:it.rationale_end])
        after = tok.decode(it.ids[it.rationale_end:], skip_special_tokens=True)
        assert "answer is" not in rationale and after.strip().startswith("Therefore, the answer is")
        assert it.step_ends[-1] == it.rationale_end and all(a < b for a, b in zip(it.step_ends, it.step_ends[1:]))


@pytest.mark.parametrize("predictor", ["student", "scratch"])
def test_lp_gradient_reaches_the_mlp_and_the_attention_layer(tmp_path, predictor):
    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    torch.manual_seed(0)
    masks = cfg.token_weights
    weighter, predictor = build_modules(masks.model_copy(update={"predictor": predictor}), model.get_input_embeddings(),
                                        tok, predictor_dir=st.model_dir)
    _, lp, _ = mask_losses(weighter, predictor, items[:4], masks, tok.pad_token_id, random.Random(0))
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
    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    s = TOKEN_WEIGHTS.run(ws, cfg, TokenWeightsInputs(
        generation=gen, steps=stp, predictor=predictor_of(ws, cfg, gen, st)))
    stored = load_weights(cat, s)
    assert s.n_rationales == len(items) == len(stored)
    for it in items:
        start, w = stored[it.rationale_id]
        assert start == it.rationale_start and len(w) == it.rationale_end - it.rationale_start
        assert all(0.0 <= x <= 1.0 for x in w)
    uniform = TOKEN_WEIGHTS.run(ws, with_token_weights(cfg, uniform=True), TokenWeightsInputs(
        generation=gen, steps=stp, predictor=st))   # uniform: no predictor
    assert uniform.fp != s.fp
    assert all(set(w) == {1.0} for _, w in load_weights(cat, uniform).values())
    assert not s.collapsed     # the weighter's own (low) learning rate keeps masks open
    collapsed = TOKEN_WEIGHTS.run(ws, with_token_weights(cfg, alpha=50.0, weighter_lr=0.05, epochs=2), TokenWeightsInputs(
        generation=gen, steps=stp, predictor=predictor_of(ws, cfg, gen, st)))
    assert collapsed.collapsed and collapsed.kept_fraction < 0.05   # reported, not silent


def test_inference_is_deterministic(tmp_path):
    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    weighter = TokenWeighter(cfg.token_weights, model.get_input_embeddings())
    a = infer_weights(weighter, items, tok.pad_token_id)
    b = infer_weights(weighter, items, tok.pad_token_id, batch_size=3)  # other padding, same weights
    assert all(x == pytest.approx(y, abs=1e-5) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_student_predictor_is_the_warmed_up_student_shared_with_difficulty(tmp_path):
    from tasks.difficulty import DIFFICULTY, DifficultyInputs
    from tasks.warmup import warm_up_student

    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    cfg = with_token_weights(cfg, predictor_warmup_epochs=2)
    cfg = cfg.model_copy(update={"difficulty": cfg.difficulty.model_copy(update={"warmup_epochs": 2})})
    predictor = warm_up_student(ws, cfg, gen, st, cfg.token_weights.predictor_warmup_epochs)
    tw = TOKEN_WEIGHTS.run(ws, cfg, TokenWeightsInputs(generation=gen, steps=stp, predictor=predictor))
    scorer = warm_up_student(ws, cfg, gen, st, cfg.difficulty.warmup_epochs)
    d = DIFFICULTY.run(ws, cfg, DifficultyInputs(generation=gen, steps=stp, token_weights=tw, scorer=scorer))
    warmups = [p for p in ws.root.joinpath("checkpoints").iterdir()]
    assert len(warmups) == 1 and d.scoring_model == str(warmups[0] / "epoch-2")   # trained once, read by both


def test_intermediate_prefixes_can_ask_for_the_next_steps_result(tmp_path):
    from tasks.token_weights import lp_target

    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    multi = [it for it in items if len(it.step_ends) > 1]
    assert multi
    for it in multi:
        text = tok.decode(it.ids[it.rationale_start:it.rationale_end])
        # the generator's steps end "... = <result> <item>.": the result is the last number of each step
        assert all(res is not None and res in text for res in it.step_results)
        assert it.step_results[-1] == it.answer
        for k in range(len(it.step_ends)):
            assert lp_target(it, k, "answer") == it.answer                       # the paper: always the final answer
            assert lp_target(it, k, "next_result") == (it.step_results[k + 1] if k + 1 < len(it.step_ends) else it.answer)


def test_keypoints_markdown_keeps_spaces_and_bolds_whole_runs():
    from tasks.token_weights_report import bold_runs

    tokens = ["Losing", " 2", ",", " w", "h", "ic", "h", " means", " 6"]
    assert bold_runs(tokens, {1, 4, 5, 6, 8}) == "Losing **2**, w**hich** means **6**"
    assert bold_runs(tokens, set()) == "".join(tokens)
    # punctuation keypoints are not bolded (markers around a lone "," show literally), markdown is escaped
    assert bold_runs(["many", ",", " so", " 3", " *", " 4"], {1, 3, 4, 5}) == "many, so **3** \\* **4**"


def test_step_result_terms_cut_before_each_steps_number_and_keep_the_answer_term(tmp_path):
    from tasks.token_weights import lp_terms

    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    tw = cfg.token_weights.model_copy(update={"intermediate_target": "step_result", "n_prefixes": 5})
    for it in items:
        terms = lp_terms(it, tw, random.Random(0))
        assert terms[0] == (it.rationale_end, it.answer)                     # the paper's whole-rationale term
        assert len(terms) == 1 + len(it.step_ends)
        for cut, target in terms[1:]:
            # cut just before a step's result; the target is that result's tokens as the rationale writes them
            assert it.rationale_start < cut < it.rationale_end and target == it.ids[cut:cut + len(target)]
            assert tok.decode(target).strip() in it.step_results


def test_penalty_scale_and_the_weighting_modules_input(tmp_path):
    from tasks.token_weights import _term_scales

    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    tw = cfg.token_weights
    it = items[0]
    n_tokens = it.rationale_end - it.rationale_start
    assert _term_scales(it, [1, 2], tw.model_copy(update={"lp_scale": "all_prefixes"})) == [n_tokens / 2] * 2
    assert _term_scales(it, [1, 2], tw.model_copy(update={"lp_scale": "sampled"})) == [1.0, 1.0]
    torch.manual_seed(0)
    weighter, predictor = build_modules(tw, model.get_input_embeddings(), tok, predictor_dir=st.model_dir)
    sums = {}
    for penalty in ("sum", "mean"):
        torch.manual_seed(1)
        _, _, sums[penalty] = mask_losses(weighter, predictor, items[:4], tw.model_copy(update={"mask_penalty": penalty}),
                                          tok.pad_token_id, random.Random(0))
    lengths = [x.rationale_end - x.rationale_start for x in items[:4]]
    assert sums["sum"] > 5 * sums["mean"] and sums["sum"] <= max(lengths)       # Σ_j m_j, not a mean
    # weighter_input 'rationale' (eq. 1): a rationale's weights do not depend on its question
    other = items[1].__class__(**{**items[0].__dict__, "ids": [items[0].ids[0], *([items[0].ids[1]] * 3),
                                                                *items[0].ids[items[0].rationale_start:]]})
    other.rationale_start, other.rationale_end = 4, 4 + n_tokens
    a, b = infer_weights(weighter, [items[0], other], tok.pad_token_id)
    assert a == pytest.approx(b, abs=1e-5)
    whole = TokenWeighter(tw.model_copy(update={"weighter_input": "sequence"}), model.get_input_embeddings())
    whole.load_state_dict(weighter.state_dict())
    a, b = infer_weights(whole, [items[0], other], tok.pad_token_id)
    assert a != pytest.approx(b, abs=1e-5)                                     # the whole sequence: it does


def test_score_function_gradient_reaches_the_weighter_not_through_the_predictor(tmp_path):
    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    tw = cfg.token_weights.model_copy(update={"estimator": "score_function", "mask_samples": 3})
    weighter, predictor = build_modules(tw, model.get_input_embeddings(), tok, predictor_dir=st.model_dir)
    loss, lp, lm = mask_losses(weighter, predictor, items[:4], tw, tok.pad_token_id, random.Random(0))
    loss.backward()
    assert weighter.mlp[0].weight.grad.abs().sum() > 0 and weighter.att.in_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in predictor.parameters())             # no backward through the predictor
    with torch.no_grad():
        w = torch.sigmoid(weighter(*_batch_ids(items[:4], tok.pad_token_id))[1])
    expected = sum(float(w[i, x.rationale_start:x.rationale_end].sum()) for i, x in enumerate(items[:4])) / 4
    assert float(lm) == pytest.approx(expected, rel=1e-5)                  # Lm = Σ_j w_j, the expected mask size
    assert float(lp) > 0


def test_the_predictor_first_reads_random_masks_and_the_trained_module_is_kept(tmp_path):
    from tasks.token_weights import load_weighter

    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    cfg = with_token_weights(cfg, predictor_mask_epochs=1, epochs=1, estimator="score_function")
    predictor = predictor_of(ws, cfg, gen, st)
    tw = TOKEN_WEIGHTS.run(ws, cfg, TokenWeightsInputs(generation=gen, steps=stp, predictor=predictor))
    assert [h["phase"] for h in tw.history] == ["predictor on random masks", "masks"]
    again = infer_weights(load_weighter(ws, cfg, tw, predictor), items, tok.pad_token_id)
    stored = load_weights(cat, tw)
    assert all(stored[it.rationale_id][1] == pytest.approx(w, abs=1e-5) for it, w in zip(items, again))


def test_the_keypoints_report_says_when_the_weights_are_nearly_uniform():
    from tasks.formats import EncodedRationale
    from tasks.token_weights_report import shaded_markdown

    class Tok:
        def decode(self, ids):
            return f" t{ids[0]}"

    item = EncodedRationale("r", list(range(10)), 1, 9, [5, 9], "3", [])
    flat = shaded_markdown(Tok(), [item], [[0.88, 0.9, 0.91, 0.92, 0.89, 0.9, 0.9, 0.91]], top_k=2)
    assert "nearly uniform** (0.88–0.92" in flat and "**" in flat
    spread = shaded_markdown(Tok(), [item], [[0.1, 0.9, 0.2, 0.95, 0.3, 0.1, 0.8, 0.2]], top_k=2)
    assert "nearly uniform" not in spread


def test_score_function_scores_each_sample_of_each_example_under_its_own_mask(tmp_path):
    """The K mask samples go through the predictor as K copies of the batch in one call: each (sample, example) Lp,
    and so each sample's advantage, is what that example's terms give under that sample's mask — the loss equals a
    loop scoring one prefix at a time over the same draws."""
    from tasks.token_weights import _term_scales, lp_terms

    ws, cfg, cat, gen, st, stp, model, tok, items = encoded_pipeline(tmp_path)
    k, batch = 3, items[:4]
    tw = cfg.token_weights.model_copy(update={"estimator": "score_function", "mask_samples": k})
    weighter, predictor = build_modules(tw, model.get_input_embeddings(), tok, predictor_dir=st.model_dir)
    torch.manual_seed(7)
    loss, lp, lm = mask_losses(weighter, predictor, batch, tw, tok.pad_token_id, random.Random(0))
    torch.manual_seed(7)
    with torch.no_grad():
        x, logits = weighter(*_batch_ids(batch, tok.pad_token_id))
        rng = random.Random(0)
        terms = [lp_terms(it, tw, rng) for it in batch]
        masks = torch.bernoulli(torch.sigmoid(logits).unsqueeze(0).expand(k, *logits.shape))
        per = torch.zeros(k, len(batch))
        for s in range(k):
            masked = masks[s].unsqueeze(-1) * x + (1 - masks[s].unsqueeze(-1)) * weighter.e_mask
            for i, it in enumerate(batch):
                for (cut, target), scale in zip(terms[i], _term_scales(it, terms[i], tw)):
                    prefix = torch.cat([x[i, :it.rationale_start], masked[i, it.rationale_start:cut]])
                    per[s, i] += scale * predictor.answer_nll([prefix], [target])[0]
        advantage = per - (per.sum(0, keepdim=True) - per) / (k - 1)
        log_p = -torch.nn.functional.binary_cross_entropy_with_logits(logits.expand_as(masks), masks, reduction="none")
        surrogate = sum((advantage[:, i] * log_p[:, i, it.rationale_start:it.rationale_end].sum(-1)).mean()
                        for i, it in enumerate(batch)) / len(batch)
    assert float(lp) == pytest.approx(float(per.mean()), rel=1e-3)
    assert float(loss - tw.alpha * lm) == pytest.approx(float(surrogate), rel=1e-3, abs=1e-4)
