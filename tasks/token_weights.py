"""Token-weights stage (KPOD §4.1): learn which rationale tokens matter for predicting the answer.

Input: kept rationales, their steps (token spans) and the student before distillation (its input embeddings
and tokenizer). Output: table `token_weights` — per kept rationale, one weight in [0, 1] per rationale token
of the student's training sequence (`token_start` = index of the first rationale token in
`<bos> prompt target <eos>`), and `keypoints` (the top-k token indices). The answer sentence is not part of
the rationale: the KPOD loss gives it weight 1.

Module (§4.1, eq. 1-3): e = Att(Emb(r)) — the student's frozen input embeddings and one self-attention
layer; w_j = sigmoid(MLP(e_j)) with a 2-layer MLP; m_j = GumbelSigmoid(w_j), straight-through hard mask.
The answer predictor sees the *masked embeddings* m_j·Emb(r_j) + (1-m_j)·e_mask, so the gradient of Lp
reaches the MLP and the attention layer (replacing token ids after a hard threshold would cut it).
Loss (§4.1, eq. 4-6): L = Lp + α·Lm, Lp = Σ_k -log P(y | x, r[m]_<k) over sampled prefixes k ending at step
boundaries (the paper sums all prefixes), Lm = Σ_j m_j over the rationale (`mask_penalty: sum`, the paper; `mean`
divides by the rationale's length). The attention reads only the rationale's tokens (`weighter_input: rationale`).

The attention layer reads the embeddings without positions (as eq. 1 writes it), so two copies of one token in a
rationale get the same weight (the lead-in "6" and the operand "6"); adding positions was measured and did not
help (docs/measurements.md).

Answer predictor (the paper: a pretrained FlanT5). Default `student`: the student after a Std-CoT warm-up
(tasks/warmup.py), kept fixed while the masks learn, so the masks must keep what a model that already reads these
rationales uses (a predictor trained from scratch alongside the masks never learns to read the rationale before
the penalty wins, and every mask collapses: docs/measurements.md).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from keystep.config import DistillConfig, TokenWeightsConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.formats import EncodedRationale, keypoints, rationale_positions
from tasks.packing import pad_stack
from tasks.stage import Made, Stage, StageInputs, StageOutput, kept_rationales
from tasks.token_weights_report import shaded_html, shaded_markdown
from tasks.steps import Steps
from tasks.student import Student, load_student, pick_device
from tasks.teacher import Generation

if TYPE_CHECKING:
    import torch

CODE_VERSION = "3"   # 3: mask_penalty, weighter_input, intermediate_target step_result, estimator


class TokenWeights(StageOutput):
    """Learned token weights: rows of `token_weights` under `fp`."""
    n_rationales: int
    n_skipped: int
    mean_weight: float
    kept_fraction: float
    history: list[dict]
    uniform: bool
    collapsed: bool
    device: str
    html: str | None = None


def load_encoded(ws: Workspace, config: DistillConfig, tokenizer, generation: Generation,
                 steps: Steps) -> tuple[list[dict], list[EncodedRationale]]:
    """(kept rationale rows, the rationale and step positions of those that fit `student.max_length`)."""
    catalog = ws.catalog()
    rows = kept_rationales(catalog, config, generation)
    spans: dict[str, list[tuple[int | None, int | None]]] = {}
    for s in catalog.query("steps_of_rationales", steps_fp=steps.fp):
        spans.setdefault(s["rationale_id"], []).append((s["token_start"], s["token_end"]))
    items = [rationale_positions(tokenizer, config.teacher, r, spans.get(r["rationale_id"], []), config.student.max_length)
             for r in rows]
    return rows, [it for it in items if it is not None]


def gumbel_sigmoid(logits: "torch.Tensor", tau: float, hard: bool = True) -> "torch.Tensor":
    """Relaxed Bernoulli sample; with `hard`, a 0/1 mask whose gradient is the relaxed sample's (straight-through)."""
    import torch

    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


def _batch_ids(items: list[EncodedRationale], pad_id: int, device=None):
    """(ids, real-token mask, rationale-token mask), right-padded."""
    import torch

    ids, pad = pad_stack([it.ids for it in items], pad_id, dtype=torch.long)
    rationale = torch.zeros_like(pad)
    for i, it in enumerate(items):
        rationale[i, it.rationale_start:it.rationale_end] = True
    return ids.to(device), pad.to(device), rationale.to(device)


def lp_terms(item: EncodedRationale, cfg: TokenWeightsConfig, rng: random.Random) -> list[tuple[int, str | list[int]]]:
    """The (cut point, target) pairs of one example's Lp: `n_prefixes` sampled step ends, each asked for the answer
    (or, `next_result`, the next step's result). With `step_result`: the whole rationale asked for the answer (the
    paper's k = n term), plus `n_prefixes` sampled steps, each cut just before the number it ends with and asked
    for that number — the sub-answer the step's own operands and operator produce."""
    if cfg.intermediate_target == "step_result":
        steps = [k for k, span in enumerate(item.result_spans) if span and span[0] > item.rationale_start]
        picked = rng.sample(steps, min(cfg.n_prefixes, len(steps)))
        return [(item.rationale_end, item.answer)] + \
               [(item.result_spans[k][0], item.ids[item.result_spans[k][0]:item.result_spans[k][1]]) for k in picked]
    cuts = rng.sample(item.step_ends, min(cfg.n_prefixes, len(item.step_ends)))
    return [(cut, lp_target(item, item.step_ends.index(cut), cfg.intermediate_target)) for cut in cuts]


def lp_target(item: EncodedRationale, step: int, intermediate_target: str) -> str:
    """What the predictor must produce after the prefix ending with step `step` (§4.1 eq. 5, and the
    `intermediate_target` switch for prefixes that stop before the last step)."""
    if intermediate_target == "next_result" and step + 1 < len(item.step_ends) and item.step_results[step + 1]:
        return item.step_results[step + 1]
    return item.answer


def mask_losses(weighter, predictor, items: list[EncodedRationale], cfg: TokenWeightsConfig, pad_id: int, rng: random.Random,
                unmasked: bool = False, random_masks: bool = False):
    """(L, Lp, Lm) for one batch: §4.1 eq. 4-6 with `n_prefixes` sampled cut points per example.
    `unmasked` (predictor warm-up): every token visible, only Lp. `random_masks` (predictor mask warm-up): each
    example's tokens kept with a probability drawn from 0.5-1, only Lp."""
    import torch

    x, logits = weighter(*_batch_ids(items, pad_id, weighter.e_mask.device))
    terms = [lp_terms(it, cfg, rng) for it in items]
    if cfg.estimator == "score_function" and not (unmasked or random_masks):
        return _score_function_losses(weighter, predictor, items, terms, x, logits, cfg)
    if random_masks:
        keep = torch.empty((len(items), 1), device=x.device).uniform_(0.5, 1.0)
        m = torch.bernoulli(keep.expand_as(logits))
        unmasked = True   # only Lp: the masks are not learned here
    elif unmasked:
        m = torch.ones_like(logits)
    else:
        m = gumbel_sigmoid(logits, cfg.gumbel_tau, hard=cfg.estimator == "straight_through")
    masked = m.unsqueeze(-1) * x + (1 - m.unsqueeze(-1)) * weighter.e_mask  # masked embeddings, not masked ids
    prefixes, answers, scale = _lp_inputs(x, masked, items, terms, cfg)
    lp = (predictor.answer_nll(prefixes, answers) * scale).sum() / len(items)   # Σ over prefixes k, mean over examples
    lm = _mask_size([m[i, it.rationale_start:it.rationale_end] for i, it in enumerate(items)], cfg)
    return (lp, lp, lm) if unmasked else (lp + cfg.alpha * lm, lp, lm)


def _lp_inputs(x: "torch.Tensor", masked: "torch.Tensor", items: list[EncodedRationale], terms: list,
               cfg: TokenWeightsConfig) -> tuple[list, list, "torch.Tensor"]:
    """Lp's terms for every (example, term): the question unmasked and the rationale masked up to the cut point k,
    the term's target, and its weight (`_term_scales`)."""
    import torch

    return ([torch.cat([x[i, :it.rationale_start], masked[i, it.rationale_start:cut]])
             for i, (it, its_terms) in enumerate(zip(items, terms)) for cut, _ in its_terms],
            [target for its_terms in terms for _, target in its_terms],
            torch.tensor([s for it, t in zip(items, terms) for s in _term_scales(it, t, cfg)], device=x.device))


def _term_scales(item: EncodedRationale, terms: list, cfg: TokenWeightsConfig) -> list[float]:
    """Per sampled prefix term, its weight in Lp: 'all_prefixes' — L / (terms sampled), so an example's Lp is in
    scale the paper's sum over its L token prefixes (eq. 5); 'sampled' — 1."""
    if cfg.lp_scale == "sampled":
        return [1.0] * len(terms)
    return [(item.rationale_end - item.rationale_start) / len(terms)] * len(terms)


def _mask_size(per_rationale_masks: list, cfg: TokenWeightsConfig):
    """eq. 6: Lm = Σ_j m_j over a rationale's tokens (mean over examples, as Lp); 'mean' divides by its length too."""
    import torch

    return torch.stack([t.sum() if cfg.mask_penalty == "sum" else t.mean() for t in per_rationale_masks]).mean()


def _score_function_losses(weighter, predictor, items, terms, x, logits, cfg: TokenWeightsConfig):
    """`estimator: score_function`. Masks m ~ Bernoulli(w) on the rationale; Lp of each of `mask_samples` masks
    under no grad; ∂E[Lp]/∂logit by REINFORCE, each sample's baseline the mean Lp of the others (Kool et al.,
    "Buy 4 REINFORCE samples, get a baseline for free", 2019); Lm = Σ_j w_j, the expected mask size, exactly.
    Returns (surrogate + α·Lm, E[Lp], Lm)."""
    import torch

    k = cfg.mask_samples
    w = torch.sigmoid(logits)
    masks = torch.bernoulli(w.detach().unsqueeze(0).expand(k, *w.shape))          # (K, batch, length)
    with torch.no_grad():   # the K samples as K copies of the batch, sample-major
        masked = masks.unsqueeze(-1) * x + (1 - masks.unsqueeze(-1)) * weighter.e_mask
        prefixes, answers, scale = _lp_inputs(x.repeat(k, 1, 1), masked.flatten(0, 1), items * k, terms * k, cfg)
        owner = [j for j, its_terms in enumerate(terms * k) for _ in its_terms]
        nll = predictor.answer_nll(prefixes, answers) * scale
        lp = torch.zeros(k * len(items), device=nll.device).index_add_(0, torch.tensor(owner, device=nll.device), nll)
        lp = lp.view(k, len(items))                                              # Σ over an example's prefixes
        advantage = lp - (lp.sum(0, keepdim=True) - lp) / (k - 1)
    log_p = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits.unsqueeze(0).expand_as(masks), masks, reduction="none")           # log P(m_j | w_j)
    surrogate = 0.0
    lm_terms = []
    for i, it in enumerate(items):
        r = slice(it.rationale_start, it.rationale_end)
        surrogate = surrogate + (advantage[:, i] * log_p[:, i, r].sum(-1)).mean()
        lm_terms.append(w[i, r])
    surrogate = surrogate / len(items)
    lm = _mask_size(lm_terms, cfg)
    return surrogate + cfg.alpha * lm, lp.mean(0).mean(), lm


def train_masks(cfg: TokenWeightsConfig, embedding, tokenizer, items: list[EncodedRationale],
                on_epoch: Callable[[int, dict], None] | None = None, predictor_dir: str | None = None,
                answer_template: str = "Therefore, the answer is {answer}.", device: str = "cpu"):
    import torch

    from tasks.token_weighting import AnswerPredictor, TokenWeighter

    torch.manual_seed(cfg.seed)
    weighter = TokenWeighter(cfg, embedding).to(device)
    predictor = AnswerPredictor(cfg, embedding, tokenizer, predictor_dir, answer_template).to(device)
    weighter_params = [p for p in weighter.parameters() if p.requires_grad]
    params = weighter_params + list(predictor.parameters())
    opt = torch.optim.AdamW([{"params": weighter_params, "lr": cfg.weighter_lr},
                             {"params": list(predictor.parameters()), "lr": cfg.lr}], weight_decay=0.0)
    rng = random.Random(cfg.seed)
    history = []
    # a scratch predictor first learns to read unmasked rationales here; the student predictor arrives warmed up.
    # Then (predictor_mask_epochs) it learns to read randomly masked ones, then the masks are learned.
    warm = cfg.predictor_warmup_epochs if cfg.predictor == "scratch" else 0
    masked_warm = warm + cfg.predictor_mask_epochs
    for epoch in range(1, masked_warm + cfg.epochs + 1):
        unmasked, random_masks = epoch <= warm, warm < epoch <= masked_warm
        if epoch > masked_warm and cfg.freeze_predictor:
            predictor.requires_grad_(False)  # gradients still flow through it to the masked embeddings
        order = list(range(len(items)))
        rng.shuffle(order)
        sums, n = {"loss": 0.0, "lp": 0.0, "lm": 0.0}, 0
        for b in range(0, len(order), cfg.batch_size):
            loss, lp, lm = mask_losses(weighter, predictor, [items[j] for j in order[b:b + cfg.batch_size]], cfg,
                                       tokenizer.pad_token_id, rng, unmasked=unmasked, random_masks=random_masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], 1.0)
            opt.step()
            for k, v in (("loss", loss), ("lp", lp), ("lm", lm)):
                sums[k] += v.item()
            n += 1
        metrics = {"epoch": epoch, "phase": "predictor warm-up" if unmasked else
                   "predictor on random masks" if random_masks else "masks",
                   **{k: v / max(n, 1) for k, v in sums.items()}}
        history.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
    return weighter, history


def infer_weights(weighter, items: list[EncodedRationale], pad_id: int, batch_size: int = 64) -> list[list[float]]:
    """w_j = sigmoid(MLP(e_j)) for the rationale tokens of each item (no noise at inference)."""
    import torch

    weighter.eval()
    out = []
    with torch.no_grad():
        for b in range(0, len(items), batch_size):
            chunk = items[b:b + batch_size]
            _, logits = weighter(*_batch_ids(chunk, pad_id, weighter.e_mask.device))
            w = torch.sigmoid(logits)
            out += [w[i, it.rationale_start:it.rationale_end].tolist() for i, it in enumerate(chunk)]
    return out


class TokenWeightsInputs(StageInputs):
    """The rationales and their steps, and `predictor`: the student whose embeddings the module reads (and, for
    `predictor: student`, the answer predictor)."""
    generation: Generation
    steps: Steps
    predictor: Student


def token_weights_lineage(config: DistillConfig, inputs: TokenWeightsInputs) -> Lineage:
    return Lineage("token-weights", {"token_weights": config.token_weights, "device": config.train.device},
                   (inputs.generation.fp, inputs.steps.fp, inputs.predictor.fp), CODE_VERSION)


def learn_token_weights(ws: Workspace, config: DistillConfig, inputs: TokenWeightsInputs, lineage: Lineage,
                        on_epoch: Callable[[int, dict], None] | None = None) -> Made:
    cfg, predictor = config.token_weights, inputs.predictor
    fp, device = lineage.fp, pick_device(config.train.device)
    model, tokenizer = load_student(predictor.model_dir, device=device)
    rows, items = load_encoded(ws, config, tokenizer, inputs.generation, inputs.steps)
    history: list[dict] = []
    if cfg.uniform:  # ablation: no token weighting
        weights = [[1.0] * (it.rationale_end - it.rationale_start) for it in items]
    else:
        weighter, history = train_masks(cfg, model.get_input_embeddings(), tokenizer, items, on_epoch,
                                        predictor.model_dir, config.teacher.answer_template, device)
        weights = infer_weights(weighter, items, tokenizer.pad_token_id)
        import torch
        weighter_path(ws, fp).parent.mkdir(parents=True, exist_ok=True)
        torch.save(weighter.state_dict(), weighter_path(ws, fp))   # to weigh new rationales (load_weighter)
    table = [{"token_weights_fp": fp, "rationale_id": it.rationale_id, "token_start": it.rationale_start, "weights": w,
              "keypoints": keypoints(w, cfg.top_k)} for it, w in zip(items, weights)]
    kept = sum(x >= 0.5 for w in weights for x in w)
    total = sum(len(w) for w in weights)
    report = ws.root / "reports" / f"{fp}.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(shaded_html(tokenizer, items, weights))
    out = TokenWeights(fp=fp, n_rationales=len(items), n_skipped=len(rows) - len(items),
                       mean_weight=sum(map(sum, weights)) / max(total, 1), kept_fraction=kept / max(total, 1),
                       history=history, uniform=cfg.uniform, device=device, html=str(report),
                       # collapsed masks leave the KPOD loss almost nothing to train on in the rationale: say so
                       collapsed=not cfg.uniform and kept < 0.05 * max(total, 1))
    report.with_suffix(".md").write_text(shaded_markdown(tokenizer, items, weights, cfg.top_k))
    return Made(out, {"token_weights": table})


def weighter_path(ws: Workspace, fp: str) -> Path:
    return ws.root / "models" / f"{fp}-weighter.pt"


def load_weighter(ws: Workspace, config: DistillConfig, token_weights: TokenWeights, predictor: Student):
    """The trained weighting module of `token_weights` (for `infer_weights` on rationales it did not see)."""
    import torch

    from tasks.token_weighting import TokenWeighter

    model, _ = load_student(predictor.model_dir)
    weighter = TokenWeighter(config.token_weights, model.get_input_embeddings())
    weighter.load_state_dict(torch.load(weighter_path(ws, token_weights.fp), weights_only=True))
    return weighter


def load_weights(catalog, token_weights: TokenWeights) -> dict[str, tuple[int, list[float]]]:
    """rationale_id -> (position of its first rationale token, one weight per rationale token)."""
    return {r["rationale_id"]: (r["token_start"], list(r["weights"]))
            for r in catalog.query("token_weights_of", token_weights_fp=token_weights.fp)}


TOKEN_WEIGHTS = Stage("token-weights", TokenWeightsInputs, TokenWeights, token_weights_lineage, learn_token_weights,
                      tags=["gpu"])


@TOKEN_WEIGHTS.in_prefect
def _token_weights_in_prefect(run, config: DistillConfig, inputs: TokenWeightsInputs, lineage: Lineage) -> TokenWeights:
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    out = run(on_epoch=lambda e, m: logger.info("masks epoch %d: L %.3f Lp %.3f Lm %.3f", e, m["loss"], m["lp"],
                                                m["lm"]))
    if out.collapsed:
        logger.warning("token weights collapsed: %.1f%% of rationale tokens have weight >= 0.5, so the KPOD loss "
                       "barely trains on rationales; lower token_weights.weighter_lr or token_weights.alpha",
                       100 * out.kept_fraction)
    if out.html:
        create_markdown_artifact(key="token-weights", markdown=Path(out.html).with_suffix(".md").read_text(),
                                 description=f"learned token weights, keypoints in bold; shaded page: {out.html}")
    return out
