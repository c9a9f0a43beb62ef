"""Step-difficulty stage (KPOD §4.2): how hard each rationale step is for the student before distillation.

Input: kept rationales, steps (token spans), token weights, the student before distillation. Output: table
`step_difficulty` (difficulty, n_tokens per rationale step; the answer sentence is not a step here).

d_k = Σ_{j ∈ step k} softmax_{step k}(w)_j · (−log P(r_j | r_<j, x; θ_s))   (§4.2, eq. 7)
with θ_s the student before distillation; `weighted: false` (ablation) uses the plain mean NLL of the step.

Scoring is batched with no grad and length-bucketed: sequences sorted by length and packed up to a token
budget, so a batch wastes little padding (bench/difficulty_throughput.py measures it against fixed padding).

Warm-up for a scratch student: a randomly initialised model gives every token about log(V) nats, which
says nothing about difficulty. So, when `student.model` is `scratch`, θ_s is the student after
`difficulty.warmup_epochs` of Std-CoT training (`tasks.train.warm_up_student`, shared with the token weights'
answer predictor) — a model that has seen the data, whose per-token losses separate easy tokens (filler it has
learned) from hard ones (arithmetic results). The warm-up model is used for scoring only; distillation still
starts from the untrained student.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from keystep.config import DifficultyConfig, TeacherConfig
from storage.fingerprint import fingerprint
from tasks.keypoints import EncodedRationale, load_encoded, load_weights

if TYPE_CHECKING:
    import torch

CODE_VERSION = "1"


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
    if cur:
        out.append(cur)
    return out


def token_nll(model, items: list[EncodedRationale], batch_tokens: int, device: str, bucketed: bool = True,
              fixed_width: int | None = None) -> list[list[float]]:
    """Per item, −log P(token_j | tokens_<j) for j ≥ 1 (index j−1 in the returned list)."""
    import torch

    model.eval()
    out: list[list[float]] = [[] for _ in items]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        for batch in buckets(items, batch_tokens, bucketed, fixed_width):
            width = fixed_width if not bucketed else max(len(items[i].ids) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : len(items[i].ids)] = torch.tensor(items[i].ids)
                mask[r, : len(items[i].ids)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            for r, i in enumerate(batch):
                out[i] = nll[r, : len(items[i].ids) - 1].tolist()
    return out


def step_difficulties(item: EncodedRationale, nll: list[float], weights: list[float] | None, weighted: bool) -> list[tuple[float, int]]:
    """§4.2 eq. 7 for each step of one rationale: (d_k, n_tokens)."""
    out = []
    for a, b in step_token_spans(item):
        losses = [nll[j - 1] for j in range(a, b)]
        if weighted and weights is not None:
            w = [weights[j - item.rationale_start] for j in range(a, b)]
            top = max(w)
            exp = [math.exp(x - top) for x in w]
            z = sum(exp)
            out.append((sum(e / z * loss for e, loss in zip(exp, losses)), b - a))
        else:
            out.append((sum(losses) / len(losses), b - a))
    return out


def difficulty_fingerprint(cfg: DifficultyConfig, weights_fp: str, student_fp: str) -> str:
    return fingerprint("difficulty", cfg, [weights_fp, student_fp], CODE_VERSION)


def score_difficulty(catalog, cfg: DifficultyConfig, teacher_cfg: TeacherConfig, generation: dict, steps_fp: str,
                     weights_fp: str, student: dict, scratch: bool, max_length: int, fp: str) -> dict:
    """`student`: {"model_dir", "student_fp"} of the student before distillation."""
    done = catalog.stage_output(fp)
    if done:
        return done["summary"]
    from tasks.student import load_student
    from tasks.train import pick_device, warm_up_student

    scoring_dir = warm_up_student(catalog, teacher_cfg, generation, student, cfg.warmup_epochs if scratch else 0, max_length)
    device = pick_device("auto")
    model, tokenizer = load_student(scoring_dir, device=device)
    _, items = load_encoded(catalog, tokenizer, teacher_cfg, generation, steps_fp, max_length)
    weights = load_weights(catalog, weights_fp)
    nll = token_nll(model, items, cfg.batch_tokens, device)
    table = []
    for it, losses in zip(items, nll):
        w = weights.get(it.rationale_id, (None, None))[1]
        for k, (d, n) in enumerate(step_difficulties(it, losses, w, cfg.weighted)):
            table.append({"difficulty_fp": fp, "rationale_id": it.rationale_id, "step_index": k, "difficulty": d, "n_tokens": n})
    values = [r["difficulty"] for r in table]
    summary = {"difficulty_fp": fp, "n_rationales": len(items), "n_steps": len(table), "scoring_model": str(scoring_dir),
               "mean": sum(values) / max(len(values), 1), "max": max(values, default=0.0)}
    with catalog.transaction() as con:
        con.execute("delete from step_difficulty where difficulty_fp = ?", [fp])
        catalog.insert(con, "step_difficulty", table)
        catalog.record_stage(con, fp, stage="difficulty", code_version=CODE_VERSION, config=cfg,
                             upstream=[weights_fp, steps_fp], summary=summary)
    return summary


# ---- Prefect wrapper ------------------------------------------------------------------------------
from storage.workspace import Workspace  # noqa: E402
from tasks.prefect_stage import stage_task  # noqa: E402


@stage_task("step-difficulty", tags=["gpu"])
def difficulty_task(workspace: str, cfg: DifficultyConfig, teacher_cfg: TeacherConfig, generation: dict, steps: dict,
                    weights: dict, student: dict, scratch: bool, max_length: int, fp: str) -> dict:
    ws = Workspace(workspace)
    return score_difficulty(ws.catalog(), cfg, teacher_cfg, generation, steps["steps_fp"], weights["weights_fp"],
                            student, scratch, max_length, fp)
