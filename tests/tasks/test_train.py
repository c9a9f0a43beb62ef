import json

import pytest
import torch

from storage.workspace import Workspace
from tasks.steps import split_rationales, steps_fingerprint
from tasks.train import IGNORE, encode_example, last_whole_epoch, train_fingerprint, train_student
from tests.tasks.helpers import prepared


class Killed(Exception):
    pass


def run_training(ws, cfg, cat, gen, st, kill_after=None):
    fp = train_fingerprint(cfg.train, st["student_fp"], "steps", gen["fingerprint"])

    def on_epoch(epoch, total, metrics):
        if kill_after and epoch == kill_after:
            raise Killed()

    return train_student(cat, cfg.train, cfg.teacher, gen, st["model_dir"], ws.checkpoints_root(fp), fp,
                         cfg.student.max_length, cfg.model_dump(mode="json"), on_epoch=on_epoch)


def weights(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_loss_decreases_and_checkpoints_hold_config(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=48, **{"train.epochs": 4, "train.lr": 0.01, "train.batch_size": 8})
    s = run_training(ws, cfg, cat, gen, st)
    losses = [h["loss"] for h in s["history"]]
    assert losses[-1] < losses[0] * 0.8
    saved = json.loads((ws.checkpoints_root(s["train_fp"]) / "epoch-4" / "keystep_config.json").read_text())
    assert saved["train"]["epochs"] == 4 and saved["student"]["model"] == "scratch"
    assert len(cat.execute("select * from checkpoints where train_fp = ?", [s["train_fp"]])) == 4


def test_resume_from_last_whole_epoch_equals_uninterrupted(tmp_path):
    ws_a, ws_b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    cfg, cat, gen, st = prepared(ws_a, **{"train.epochs": 3})
    full = run_training(ws_a, cfg, cat, gen, st)
    cfg, cat, gen, st = prepared(ws_b, **{"train.epochs": 3})
    with pytest.raises(Killed):
        run_training(ws_b, cfg, cat, gen, st, kill_after=2)
    fp = full["train_fp"]
    assert last_whole_epoch(ws_b.checkpoints_root(fp)) == 2
    resumed = run_training(ws_b, cfg, cat, gen, st)
    assert resumed["resumed_from_epoch"] == 2
    a, b = weights(full["final_dir"]), weights(resumed["final_dir"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["loss"] for h in full["history"]] == pytest.approx([h["loss"] for h in resumed["history"]], rel=1e-5)


def test_prompt_tokens_carry_no_loss(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(st["model_dir"])
    ids, labels, truncated = encode_example(tok, "Q: a?\nA: Let's think step by step.", "So 3. Therefore, the answer is 3.", 96)
    target = tok.decode([t for t, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=True)
    assert target.strip() == "So 3. Therefore, the answer is 3."
    assert labels[0] == IGNORE and labels[-1] == tok.eos_token_id and not truncated


def test_steps_stage_token_spans_match_training_tokens(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16)
    fp = steps_fingerprint(cfg.steps, gen["fingerprint"], st["student_fp"])
    s = split_rationales(cat, cfg.steps, cfg.teacher, gen, st["model_dir"], fp)
    assert s["n_rationales"] == 16 and s["n_steps"] > 16
    rows = cat.query("steps_of_rationales", steps_fp=fp)
    assert all(r["token_start"] is not None and r["token_end"] > r["token_start"] for r in rows)
