"""Packed batches: the same loss as padded ones, and no sequence sees another."""
import pytest
import torch

from keystep.config import TrainConfig
from storage.workspace import Workspace
from tasks.formats import IGNORE, Sequence
from tasks.packing import collate, collate_packed, model_inputs, pack_rows
from tasks.student import load_student
from tasks.train import TRAIN
from tasks.training import CurriculumSequences, TrainInputs, micro_batches, optimizer_steps, weighted_nll_sum
from tests.tasks.helpers import kpod_prepared, prepared


def loss_sum(model, batch):
    return weighted_nll_sum(model(**model_inputs(batch)).logits, batch["labels"], batch["weights"])


def test_pack_rows_places_every_sequence_once_within_the_row_length():
    lengths = [90, 30, 60, 120, 10, 45, 200, 5]
    rows = pack_rows(lengths, row_length=128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows if len(row) > 1)
    assert [6] in rows                       # longer than a row: a row of its own
    assert sorted(map(sorted, rows)) == [[0, 1], [2, 4, 5], [3, 7], [6]]   # 90+30 | 60+10+45 | 120+5 | 200


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_kpod_loss_equals_padded_loss_with_weights_and_prefixes(tmp_path, attention):
    """fp32: Σ weighted NLL of packed rows == Σ over the same sequences one per padded row (1e-4), for a curriculum
    stage with step prefixes (no loss on them) and the learned token weights."""
    torch.manual_seed(0)
    ws = Workspace(tmp_path)
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=24, epochs=2)
    model, tok = load_student(st.model_dir)
    model.set_attn_implementation(attention)
    model.eval()
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    data = CurriculumSequences(cat, tok, cfg.teacher, cfg.train, cfg.student.max_length, rows, kpod["steps"],
                               kpod["token_weights"], kpod["curriculum"]).sequences(1)
    assert any(w != 1.0 for s in data for w in s.weights)             # real token weights in play
    with torch.no_grad():
        padded = loss_sum(model, collate(data, tok.pad_token_id))
        for row_length in (256, 512, 4096):
            packed = collate_packed(data, tok.pad_token_id, row_length)
            assert packed["input_ids"].shape[0] < len(data)             # several sequences share rows
            assert (packed["labels"] != IGNORE).sum() == sum((torch.tensor(s.labels[1:]) != IGNORE).sum() for s in data)
            assert loss_sum(model, packed).item() == pytest.approx(padded.item(), rel=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_sequences_outputs_do_not_change_when_others_share_its_row(tmp_path, attention):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=8)
    model, tok = load_student(st.model_dir)
    model.set_attn_implementation(attention)
    model.eval()
    from tasks.formats import encode_rationale
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    seqs = [encode_rationale(tok, cfg.teacher, r, 256) for r in rows]
    packed = collate_packed(seqs, tok.pad_token_id, row_length=10_000)     # all in one row
    assert packed["input_ids"].shape[0] == 1
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()    # where each sequence begins
    with torch.no_grad():
        together = model(**model_inputs(packed)).logits[0]
        for seq in seqs:                      # every one of them, the ones after others in the row included
            seq_ids = seq.ids
            n = len(seq_ids)
            start = next(i for i in starts if packed["input_ids"][0, i:i + n].tolist() == seq_ids)
            alone = model(input_ids=torch.tensor([seq_ids])).logits[0]
            assert torch.allclose(alone, together[start:start + n], atol=1e-5)
    assert max(starts[:len(seqs)]) > 0


def test_tokens_per_batch_fills_micro_batches_up_to_the_budget():
    lengths = [50, 80, 20, 70, 90, 10, 60, 40] * 4
    cfg = TrainConfig(tokens_per_batch=200, grad_accum=2)
    batches = micro_batches(lengths, cfg, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 200 for b in batches)
    assert batches == micro_batches(lengths, cfg, epoch=1) != micro_batches(lengths, cfg, epoch=2)
    data = [Sequence([0] * n, [IGNORE] * n, [(0, 0)] * n, n) for n in lengths]
    assert [len(g) for g in optimizer_steps(data, cfg, 1)][:-1] == [2] * (len(optimizer_steps(data, cfg, 1)) - 1)


def test_packed_and_padded_training_give_the_same_run(tmp_path):
    """The same optimizer steps either way: the loss history matches to float noise."""
    histories = {}
    for packing in (True, False):
        ws = Workspace(tmp_path / str(packing))
        cfg, cat, gen, st = prepared(ws, n=32, **{"train.epochs": 2, "train.packing": packing})
        histories[packing] = [h["loss"] for h in TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st)).history]
    assert histories[True] == pytest.approx(histories[False], rel=1e-4)
