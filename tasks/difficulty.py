"""Step-difficulty stage (KPOD §4.2): how hard each rationale step is for the student before distillation.

Input: kept rationales, steps (token spans), token weights, the student before distillation. Output: table
`step_difficulty` (difficulty, n_tokens per rationale step; the answer sentence is not a step here).

d_k = Σ_{j ∈ step k} softmax_{step k}(w)_j · (−log P(r_j | r_<j, x; θ_s))   (§4.2, eq. 7)
with θ_s the student before distillation; `weighted: false` (ablation) uses the plain mean NLL of the step.

Scoring is batched with no grad and length-bucketed: sequences sorted by length and packed up to a token
budget, so a batch wastes little padding (bench/difficulty_throughput.py measures it against fixed padding).

θ_s for a scratch student is the student after `difficulty.warmup_epochs` of Std-CoT (tasks/warmup.py): a
randomly initialised model gives every token about log(V) nats, which says nothing about difficulty. The warm-up
model scores only; distillation still starts from the untrained student.
"""
from __future__ import annotations

import math

from keystep.config import DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.formats import EncodedRationale
from tasks.packing import pad_stack
from tasks.stage import Made, Stage, StageInputs, StageOutput
from tasks.steps import Steps
from tasks.student import Student, load_student, pick_device
from tasks.teacher import Generation
from tasks.token_weights import TokenWeights, load_encoded, load_weights

CODE_VERSION = "1"


class Difficulty(StageOutput):
    """Step difficulty: rows of `step_difficulty` under `fp`."""
    n_rationales: int
    n_steps: int
    scoring_model: str
    device: str
    mean: float
    max: float


def step_token_spans(item: EncodedRationale) -> list[tuple[int, int]]:
    """Token spans of the rationale steps: consecutive step ends inside [rationale_start, rationale_end)."""
    spans, start = [], item.rationale_start
    for end in item.step_ends:
        if end > start:
            spans.append((start, end))
            start = end
    return spans


def buckets(items: list[EncodedRationale], batch_tokens: int, bucketed: bool = True, fixed_width: int | None = None):
    """Index batches. Bucketed: sorted by length, packed to `batch_tokens` (padding included).
    Otherwise (the naive baseline): dataset order, every sequence padded to `fixed_width`."""
    if not bucketed:
        per = max(1, batch_tokens // fixed_width)
        return [list(range(i, min(i + per, len(items)))) for i in range(0, len(items), per)]
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    out, cur, width = [], [], 0
    for i in order:
        w = max(width, len(items[i].ids))
        if cur and w * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, w = [], len(items[i].ids)
        cur.append(i)
        width = w
    return out + [cur] if cur else out


def token_nll(model, items: list[EncodedRationale], batch_tokens: int, device: str, bucketed: bool = True,
              fixed_width: int | None = None) -> list[list[float]]:
    """Per item, −log P(token_j | tokens_<j) for j ≥ 1 (index j−1 in the returned list)."""
    import torch

    model.eval()
    out: list[list[float]] = [[] for _ in items]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        for batch in buckets(items, batch_tokens, bucketed, fixed_width):
            ids, mask = pad_stack([items[i].ids for i in batch], pad_id, width=None if bucketed else fixed_width,
                                  dtype=torch.long)
            ids, mask = ids.to(device), mask.long().to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            for r, i in enumerate(batch):
                out[i] = nll[r, : len(items[i].ids) - 1].tolist()
    return out


def step_difficulties(item: EncodedRationale, nll: list[float], weights: list[float] | None, weighted: bool,
                      temperature: float = 1.0) -> list[tuple[float, int]]:
    """§4.2 eq. 7 for each step of one rationale: (d_k, n_tokens); the softmax over w / `temperature`."""
    out = []
    for a, b in step_token_spans(item):
        losses = [nll[j - 1] for j in range(a, b)]
        if weighted and weights is not None:
            w = [weights[j - item.rationale_start] for j in range(a, b)]
            top = max(w)
            exp = [math.exp((x - top) / temperature) for x in w]
            z = sum(exp)
            out.append((sum(e / z * loss for e, loss in zip(exp, losses)), b - a))
        else:
            out.append((sum(losses) / len(losses), b - a))
    return out


class DifficultyInputs(StageInputs):
    """The rationales, their steps and token weights, and `scorer`: the student before distillation (warmed up, for
    a scratch student)."""
    generation: Generation
    steps: Steps
    token_weights: TokenWeights
    scorer: Student


def difficulty_lineage(config: DistillConfig, inputs: DifficultyInputs) -> Lineage:
    i = inputs
    return Lineage("difficulty", {"difficulty": config.difficulty, "device": config.train.device},
                   (i.generation.fp, i.steps.fp, i.token_weights.fp, i.scorer.fp), CODE_VERSION)


def score_difficulty(ws: Workspace, config: DistillConfig, inputs: DifficultyInputs, lineage: Lineage) -> Made:
    cfg, scorer, device = config.difficulty, inputs.scorer, pick_device(config.train.device)
    model, tokenizer = load_student(scorer.model_dir, device=device)
    _, items = load_encoded(ws, config, tokenizer, inputs.generation, inputs.steps)
    weights, table = load_weights(ws.catalog(), inputs.token_weights), []
    for it, losses in zip(items, token_nll(model, items, cfg.batch_tokens, device)):
        w = weights.get(it.rationale_id, (None, None))[1]
        for k, (d, n) in enumerate(step_difficulties(it, losses, w, cfg.weighted, cfg.temperature)):
            table.append({"difficulty_fp": lineage.fp, "rationale_id": it.rationale_id, "step_index": k,
                          "difficulty": d, "n_tokens": n})
    values = [r["difficulty"] for r in table]
    out = Difficulty(fp=lineage.fp, n_rationales=len(items), n_steps=len(table), scoring_model=scorer.model_dir,
                     device=device, mean=sum(values) / max(len(values), 1), max=max(values, default=0.0))
    return Made(out, {"step_difficulty": table})


DIFFICULTY = Stage("difficulty", DifficultyInputs, Difficulty, difficulty_lineage, score_difficulty, tags=["gpu"])
