"""Training batches: padded (one sequence per row) or packed (sequences end to end in rows, no attention across
their borders).

Input: `Sequence`s, as tasks/formats.py encodes them (KPOD's curriculum prefix is already in the labels: the prefix
steps carry IGNORE; its token weights in `weights`). Output: the tensors one forward pass takes. Also `pad_stack`,
the one padding helper.

Packing is the padding-free collation of transformers' DataCollatorWithFlattening, in rows of `row_length` tokens:
each sequence keeps its own position ids (0..n-1) and the model gets `position_ids` and no attention mask, from
which transformers builds the block-diagonal causal mask (flash-attention varlen, SDPA and FlexAttention alike).
Labels and token weights travel with their tokens, and a sequence's first token never carries loss, so the summed
loss of a packed row is exactly the sum of its sequences' losses (tests/tasks/test_packing.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.formats import IGNORE, Sequence

if TYPE_CHECKING:
    import torch


def pad_stack(rows: list, fill: float | int = 0, width: int | None = None, dtype=None):
    """Rows of different lengths (lists, or tensors whose first dimension is the length) right-padded with `fill`
    to the longest (or `width`) and stacked: (padded, mask of the real positions). The one padding of the code base:
    training batches, the token-weighting module's ids and embeddings, difficulty scoring.

    >>> padded, mask = pad_stack([[5, 6, 7], [8]], fill=0)
    >>> padded.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[True, True, True], [True, False, False]])
    """
    import torch

    rows = [r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=dtype) for r in rows]
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=dtype or rows[0].dtype,
                     device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


def collate(batch: list[Sequence], pad_id: int) -> dict[str, "torch.Tensor"]:
    """One sequence per row, right-padded to the longest; weights default to 1."""
    import torch

    ids, mask = pad_stack([s.ids for s in batch], pad_id, dtype=torch.long)
    labels, _ = pad_stack([s.labels for s in batch], IGNORE, dtype=torch.long)
    weights, _ = pad_stack([s.loss_weights() for s in batch], 0.0, dtype=torch.float32)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask.long(), "weights": weights}
    if batch[0].teacher_topk is not None:   # logit distillation: the teacher's rows travel with their tokens
        out["teacher_ids"], _ = pad_stack([torch.from_numpy(s.teacher_topk[0]) for s in batch], 0)
        out["teacher_logprobs"], _ = pad_stack([torch.from_numpy(s.teacher_topk[1]) for s in batch], 0.0)
    return out


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: the sequence indices of each row, every row's total length <= row_length (a sequence
    longer than a row gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(row_length - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def collate_packed(batch: list[Sequence], pad_id: int, row_length: int) -> dict[str, "torch.Tensor"]:
    """Sequences packed into rows (as wide as the fullest row, at most `row_length` unless one sequence is
    longer); position ids restart at 0 for every sequence and for the padding at a row's end."""
    import torch

    rows = pack_rows([len(s.ids) for s in batch], row_length)
    width = max(sum(len(batch[i].ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    topk = batch[0].teacher_topk
    if topk is not None:   # logit distillation: the teacher's rows travel with their tokens
        t_ids = torch.zeros((len(rows), width, topk[0].shape[1]), dtype=torch.long)
        t_lp = torch.zeros((len(rows), width, topk[0].shape[1]))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            seq = batch[i]
            n = len(seq.ids)
            ids[r, at:at + n] = torch.tensor(seq.ids)
            labels[r, at + 1:at + n] = torch.tensor(seq.labels[1:])   # the first token is never predicted (Sequence.supervised)
            weights[r, at:at + n] = torch.tensor(seq.loss_weights())
            if topk is not None:
                t_ids[r, at:at + n] = torch.from_numpy(seq.teacher_topk[0])
                t_lp[r, at:at + n] = torch.from_numpy(seq.teacher_topk[1])
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    out = {"input_ids": ids, "labels": labels, "position_ids": positions, "weights": weights}
    return out if topk is None else {**out, "teacher_ids": t_ids, "teacher_logprobs": t_lp}


def model_inputs(batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """What the model's forward takes from a collated batch (no cache: a cache would hide the packing)."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {"use_cache": False, **{k: batch[k] for k in keys if k in batch}}
