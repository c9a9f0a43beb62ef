import json

import pytest
import torch

from storage.workspace import Workspace
from tasks.formats import IGNORE, encode, format_prompt, training_target
from tasks.steps import STEPS, StepsInputs
from tasks.train import TRAIN
from tasks.training import CurriculumSequences, TrainInputs, collate, last_whole_epoch, weighted_nll
from tests.tasks.helpers import kpod_prepared, prepared


def encode_example(tok, prompt, target, max_length):
    seq = encode(tok, prompt, target, max_length)
    return seq.ids, seq.labels, seq.truncated


class Killed(Exception):
    pass


def train_killable(ws, cfg, cat, gen, st, kill_after=None, kpod=None):
    def on_epoch(epoch, total, metrics):
        if kill_after and epoch == kill_after:
            raise Killed()

    return TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st, **(kpod or {})), on_epoch=on_epoch)


def weights(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_loss_decreases_and_checkpoints_hold_config(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=48, **{"train.epochs": 4, "train.lr": 0.01, "train.batch_size": 8})
    s = train_killable(ws, cfg, cat, gen, st)
    losses = [h["loss"] for h in s.history]
    assert losses[-1] < losses[0] * 0.8
    saved = json.loads((ws.checkpoints_root(s.fp) / "epoch-4" / "keystep_config.json").read_text())
    assert saved["train"]["epochs"] == 4 and saved["student"]["model"] == "scratch"
    assert len(cat.execute("select * from checkpoints where train_fp = ?", [s.fp])) == 4


@pytest.mark.parametrize("loss", ["std_cot", "kpod"])
def test_resume_from_last_whole_epoch_equals_uninterrupted(tmp_path, loss):
    # KPOD: 3 epochs = stages 1, 2, 2; killed after epoch 1, i.e. in the middle of the curriculum
    kill = 2 if loss == "std_cot" else 1
    ws_a, ws_b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    if loss == "kpod":
        cfg, cat, gen, st, kpod = kpod_prepared(ws_a, epochs=3)
    else:
        (cfg, cat, gen, st), kpod = prepared(ws_a, **{"train.epochs": 3}), None
    full = train_killable(ws_a, cfg, cat, gen, st, kpod=kpod)
    if loss == "kpod":
        cfg, cat, gen, st, kpod = kpod_prepared(ws_b, epochs=3)
    else:
        cfg, cat, gen, st = prepared(ws_b, **{"train.epochs": 3})
    with pytest.raises(Killed):
        train_killable(ws_b, cfg, cat, gen, st, kill_after=kill, kpod=kpod)
    fp = full.fp
    assert last_whole_epoch(ws_b.checkpoints_root(fp)) == kill
    resumed = train_killable(ws_b, cfg, cat, gen, st, kpod=kpod)
    assert resumed.resumed_from_epoch == kill
    if loss == "kpod":
        assert [h["stage"] for h in resumed.history] == [1, 2, 2]
    a, b = weights(full.final_dir), weights(resumed.final_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)


def test_prompt_tokens_carry_no_loss(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(st.model_dir)
    ids, labels, truncated = encode_example(tok, "Q: a?\nA: Let's think step by step.", "So 3. Therefore, the answer is 3.", 96)
    target = tok.decode([t for t, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=True)
    assert target.strip() == "So 3. Therefore, the answer is 3."
    assert labels[0] == IGNORE and labels[-1] == tok.eos_token_id and not truncated


def test_steps_stage_token_spans_match_training_tokens(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16)
    s = STEPS.run(ws, cfg, StepsInputs(generation=gen, student=st))
    assert s.n_rationales == 16 and s.n_steps > 16
    rows = cat.query("steps_of_rationales", steps_fp=s.fp)
    assert all(r["token_start"] is not None and r["token_end"] > r["token_start"] for r in rows)


def test_std_cot_loss_is_the_models_own_causal_lm_loss(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=8)
    from tasks.student import load_student
    model, tok = load_student(st.model_dir)
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    batch = collate([encode(tok, format_prompt(cfg.teacher, r["question"]), training_target(r["text"], r["answer"], cfg.teacher), 96)
                     for r in rows], tok.pad_token_id)
    with torch.no_grad():
        ours = weighted_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"], batch["weights"])
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_kpod_sequences_follow_the_curriculum_and_carry_the_token_weights(tmp_path):
    from tasks.curriculum import curriculum_shard
    from tasks.student import load_student
    from tasks.token_weights import load_weights

    ws = Workspace(tmp_path)
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=24, epochs=4)
    _, tok = load_student(st.model_dir)
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    data = CurriculumSequences(cat, tok, cfg.teacher, cfg.train, cfg.student.max_length, rows, kpod["steps"],
                               kpod["token_weights"], kpod["curriculum"])
    steps = {}
    for s in cat.query("steps_of_rationales", steps_fp=kpod["steps"].fp):
        steps.setdefault(s["rationale_id"], []).append(s["text"])
    weights = load_weights(cat, kpod["token_weights"])
    assert [data.curriculum_stage(e) for e in (1, 2, 3, 4)] == [1, 2, 2, 2]
    for epoch in (1, 4):
        prefix = curriculum_shard(kpod["curriculum"].shards_dir, data.curriculum_stage(epoch))
        given = 0
        for r, seq in zip(rows, data.sequences(epoch)):
            ids, labels, w = seq.ids, seq.labels, seq.weights
            c = prefix[r["rationale_id"]]
            given += c
            target = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE], skip_special_tokens=True)
            assert target.strip() == " ".join(steps[r["rationale_id"]][c:])     # remaining steps + answer sentence
            start, rw = weights[r["rationale_id"]]
            assert w[start:start + len(rw)] == pytest.approx(rw) and w[-1] == 1.0   # answer tokens: weight 1
        assert (given > 0) == (epoch == 1)                                     # stage T: whole rationales


def test_target_formats():
    from keystep.config import ReferenceTeacherConfig
    from tasks.formats import format_target

    t = ReferenceTeacherConfig()
    text, ans = "Mia has 3 apples. After buying 2 more, 3 + 2 = 5 apples.", "5"
    phrase = "Therefore, the answer is 5."
    assert format_target("cot_then_label", text, ans, t) == f"{text} {phrase}"
    assert format_target("cot_then_label", f"{text} {phrase}", ans, t) == f"{text} {phrase}"   # not doubled
    assert format_target("label_only", text, ans, t) == phrase
    assert format_target("label_then_cot", f"{text} {phrase}", ans, t) == f"{phrase} {text}"
    shuffled = format_target("label_then_shuffled_cot", text, ans, t, shuffle_seed="r1")
    assert shuffled.startswith(phrase + " ") and shuffled != f"{phrase} {text}"
    assert sorted(shuffled[len(phrase) + 1:].split()) == sorted(text.split())                    # same words
    assert shuffled == format_target("label_then_shuffled_cot", text, ans, t, shuffle_seed="r1")  # fixed per rationale
    assert format_target("label_then_keytokens", text, ans, t, key_text=" 3 + 2 = 5") == f"{phrase} 3 + 2 = 5"


def test_label_then_keytokens_trains_on_the_top_weighted_tokens(tmp_path):
    from tasks.formats import keytoken_text
    from tasks.student import load_student

    ws = Workspace(tmp_path)
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=16, epochs=2)
    _, tok = load_student(st.model_dir)
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    stored = {r["rationale_id"]: r for r in cat.query("token_weights_of", token_weights_fp=kpod["token_weights"].fp)}
    keys = {r["rationale_id"]: keytoken_text(tok, cfg.teacher, r, stored[r["rationale_id"]]["token_start"],
                                             stored[r["rationale_id"]]["keypoints"]) for r in rows}
    for r in rows:
        kp = stored[r["rationale_id"]]
        assert len(kp["keypoints"]) == min(cfg.token_weights.top_k, len(kp["weights"]))
        key_ids = tok(keys[r["rationale_id"]], add_special_tokens=False)["input_ids"]   # the key tokens, no <bos>
        assert all(piece.strip() in r["text"] for piece in tok.batch_decode([[t] for t in key_ids]))
    keytokens = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"loss": "std_cot", "target_format": "label_then_keytokens", "epochs": 1})})
    s = TRAIN.run(ws, keytokens, TrainInputs(generation=gen, student=st, token_weights=kpod["token_weights"]))
    assert s.target_format == "label_then_keytokens" and s.epochs == 1


def test_match_cot_tokens_gives_shorter_targets_more_epochs(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"student.max_length": 256})
    label_only = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"target_format": "label_only", "match_cot_tokens": True, "epochs": 2})})
    s = TRAIN.run(ws, label_only, TrainInputs(generation=gen, student=st))
    cot_tokens = 2 * sum(len(encode_example(__import__("transformers").AutoTokenizer.from_pretrained(st.model_dir),
                                            f"Q: {r['question']}\nA: Let's think step by step.",
                                            f"{r['text']} Therefore, the answer is {r['answer']}.", 256)[0])
                         for r in cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp,
                                            only_correct=True))
    trained_tokens = sum(h["tokens"] for h in s.history)
    assert s.epochs > 2 and abs(trained_tokens - cot_tokens) < 0.25 * cot_tokens


def test_training_units_each_do_one_thing(tmp_path):
    """setup -> run_epoch -> save_checkpoint -> cleanup, each on its own; a second setup resumes the saved epoch."""
    from tasks.train import train_lineage
    from tasks.training import cleanup, run_epoch, save_checkpoint, setup

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"train.epochs": 2, "train.batch_size": 8})
    lineage = train_lineage(cfg, TrainInputs(generation=gen, student=st))
    run = setup(ws, lineage, cfg, TrainInputs(generation=gen, student=st))
    assert run.start_epoch == 0 and run.epochs == 2 and len(run.data) == 16 and run.device == "cpu"
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    metrics = run_epoch(run, 1)
    assert metrics["epoch"] == 1 and metrics["loss"] > 0 and metrics["tokens"] == sum(len(s.ids) for s in run.data)
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())   # the model moved
    assert last_whole_epoch(run.ckpt_root) == 0                                              # nothing saved yet
    path = save_checkpoint(run, 1, metrics)
    assert path.name == "epoch-1" and (path / "trainer_state.pt").exists() and last_whole_epoch(run.ckpt_root) == 1
    assert cat.execute("select epoch from checkpoints where train_fp = ?", [lineage.fp]) == [{"epoch": 1}]
    resumed = setup(ws, lineage, cfg, TrainInputs(generation=gen, student=st))
    assert resumed.start_epoch == 1 and resumed.history == [metrics]
    assert resumed.optimizer.state_dict()["state"][0]["step"] == run.optimizer.state_dict()["state"][0]["step"]
    out = cleanup(run)
    assert run.model is None and out.fp == lineage.fp and out.final_dir == str(run.ckpt_root / "epoch-2")


def test_too_many_cut_sequences_fail_before_training_unless_allowed(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"student.max_length": 32})   # every micro sequence is longer
    with pytest.raises(ValueError, match=r"student.max_length.*16 of 16.*train.allow_truncation"):
        TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    assert cat.execute("select count(*) as n from checkpoints")[0]["n"] == 0    # failed before any epoch
    allowed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"allow_truncation": True, "epochs": 1})})
    out = TRAIN.run(ws, allowed, TrainInputs(generation=gen, student=st))
    assert out.n_truncated == out.n_examples == 16                        # counted and reported, not silent


def test_throughput_settings_change_the_speed_not_the_run(tmp_path):
    """Gradient checkpointing recomputes the same activations; bf16 weights and tokens_per_batch still train."""
    runs = {}
    for name, extra in (("plain", {}), ("checkpointed", {"train.gradient_checkpointing": True}),
                        ("bf16", {"train.precision": "bf16"}), ("by_tokens", {"train.tokens_per_batch": 600})):
        ws = Workspace(tmp_path / name)
        cfg, cat, gen, st = prepared(ws, n=32, **{"train.epochs": 2, "train.lr": 0.01, **extra})
        runs[name] = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    loss = {k: [h["loss"] for h in r.history] for k, r in runs.items()}
    assert loss["checkpointed"] == pytest.approx(loss["plain"], rel=1e-5)
    assert loss["bf16"][-1] < loss["bf16"][0] and loss["by_tokens"][-1] < loss["by_tokens"][0]
    assert runs["bf16"].history[0]["loss"] == pytest.approx(loss["plain"][0], rel=0.05)
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(runs["bf16"].final_dir).dtype == torch.bfloat16


def test_compiled_model_trains_the_same_run(tmp_path):
    """train.compile: on (the CUDA default) on the CPU: torch.compile's graph gives the eager run's losses."""
    runs = {}
    for name, extra in (("eager", {}), ("compiled", {"train.compile": "on"})):
        ws = Workspace(tmp_path / name)
        cfg, cat, gen, st = prepared(ws, n=16, **{"train.epochs": 1, "train.batch_size": 16, **extra})
        runs[name] = [h["loss"] for h in TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st)).history]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
