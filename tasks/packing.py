"""Training batches: padded (one sequence per row) or packed (sequences end to end in rows, no attention across
their borders).

Input: (ids, labels[, loss weights]) per sequence, as tasks/formats.py encodes them (KPOD's curriculum prefix is
already in the labels: the prefix steps carry IGNORE). Output: the tensors one forward pass takes.

Packing is the padding-free collation of transformers' DataCollatorWithFlattening, in rows of `row_length` tokens:
each sequence keeps its own position ids (0..n-1) and the model gets `position_ids` and no attention mask, from
which transformers builds the block-diagonal causal mask (flash-attention varlen, SDPA and FlexAttention alike).
Labels and token weights travel with their tokens, and a sequence's first token never carries loss, so the summed
loss of a packed row is exactly the sum of its sequences' losses (tests/tasks/test_packing.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.formats import IGNORE

if TYPE_CHECKING:
    import torch


def collate(batch: list[tuple], pad_id: int) -> dict[str, "torch.Tensor"]:
    """One sequence per row, right-padded to the longest; weights default to 1."""
    import torch

    width = max(len(x[0]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), width))
    for i, (x, y, *w) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
        weights[i, : len(x)] = torch.tensor(w[0]) if w else 1.0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


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


def collate_packed(batch: list[tuple], pad_id: int, row_length: int) -> dict[str, "torch.Tensor"]:
    """Sequences packed into rows (as wide as the fullest row, at most `row_length` unless one sequence is
    longer); position ids restart at 0 for every sequence and for the padding at a row's end."""
    import torch

    rows = pack_rows([len(x[0]) for x in batch], row_length)
    width = max(sum(len(batch[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y, *w = batch[i]
            n = len(x)
            ids[r, at:at + n] = torch.tensor(x)
            labels[r, at + 1:at + n] = torch.tensor(y[1:])   # the first token is never predicted from this sequence
            weights[r, at:at + n] = torch.tensor(w[0]) if w else 1.0
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "weights": weights}


def model_inputs(batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """What the model's forward takes from a collated batch (no cache: a cache would hide the packing)."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {"use_cache": False, **{k: batch[k] for k in keys if k in batch}}
