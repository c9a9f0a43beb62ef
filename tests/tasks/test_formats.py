"""The student's sequence layout (tasks/formats.py): every stage that uses token positions points at the same
tokens — training labels, evaluation prompts, step spans, token weights, difficulty spans and KPOD prefixes."""
import pytest

from storage.workspace import Workspace
from tasks.difficulty import step_token_spans
from tasks.formats import (IGNORE, encode, encode_rationale, format_prompt, format_target, generation_prompt,
                           kpod_sequence, rationale_positions)
from tasks.student import load_student
from tasks.token_weights import load_weights
from tests.tasks.helpers import kpod_prepared

FORMATS = ["cot_then_label", "label_only", "label_then_cot", "label_then_shuffled_cot", "label_then_keytokens"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("formats"))
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=16, epochs=4)
    _, tok = load_student(st.model_dir)
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    steps = {}
    for s in cat.query("steps_of_rationales", steps_fp=kpod["steps"].fp):
        steps.setdefault(s["rationale_id"], []).append(s)
    return cfg, cat, tok, rows, steps, kpod


@pytest.mark.parametrize("fmt", FORMATS)
def test_labels_are_the_target_and_evaluation_prompts_are_the_training_prefix(pipeline, fmt):
    cfg, cat, tok, rows, steps, kpod = pipeline
    for r in rows:
        target = format_target(fmt, r["text"], r["answer"], cfg.teacher, key_text=" 3 + 4 = 7", shuffle_seed=r["rationale_id"])
        seq = encode_rationale(tok, cfg.teacher, r, 1 << 30, target)
        first = next(j for j, lab in enumerate(seq.labels) if lab != IGNORE)
        # the loss is on exactly the target (and <eos>) ...
        assert tok.decode([t for t, lab in zip(seq.ids, seq.labels) if lab != IGNORE], skip_special_tokens=True).strip() == target
        assert seq.labels[-1] == tok.eos_token_id and all(lab == IGNORE for lab in seq.labels[:first])
        # ... and evaluation feeds the model exactly the tokens before it
        prompt_ids = tok(generation_prompt(tok, format_prompt(cfg.teacher, r["question"])), add_special_tokens=False).input_ids
        assert prompt_ids == seq.ids[:first]


def test_step_spans_token_weights_difficulty_and_kpod_prefixes_point_at_the_same_tokens(pipeline):
    cfg, cat, tok, rows, steps, kpod = pipeline
    weights = load_weights(cat, kpod["token_weights"])
    for r in rows:
        seq = encode_rationale(tok, cfg.teacher, r, 1 << 30)
        rsteps = steps[r["rationale_id"]]
        spans = [(s["token_start"], s["token_end"]) for s in rsteps]
        # steps stage: each span decodes to its step's text; between two steps at most a whitespace token
        for s, (a, b) in zip(rsteps, spans):
            assert tok.decode(seq.ids[a:b]).strip() == s["text"]
        assert all(tok.decode(seq.ids[b:a2]).strip() == "" for (_, b), (a2, _) in zip(spans, spans[1:]))
        # token weights: one weight per rationale token, from the first step to the answer sentence
        item = rationale_positions(tok, cfg.teacher, r, spans, cfg.student.max_length)
        start, w = weights[r["rationale_id"]]
        assert start == item.rationale_start == spans[0][0] and len(w) == item.rationale_end - start
        assert item.rationale_end == spans[-1][0]                  # the last step is the answer sentence
        assert tok.decode(seq.ids[item.rationale_end:-1]).strip() == cfg.teacher.answer_template.format(answer=r["answer"])
        # difficulty scores the steps stage's spans (the answer sentence is not a step there), each with the
        # whitespace token before it, if any: the tokens the student generates for that step
        scored = step_token_spans(item)
        assert [b for _, b in scored] == [b for _, b in spans[:-1]]
        assert all(a <= sa and tok.decode(seq.ids[a:sa]).strip() == "" for (a, _), (sa, _) in zip(scored, spans))
        # KPOD stage with c input steps: loss starts at step c's first token, weights sit on the same positions
        for c in range(len(rsteps)):
            staged = kpod_sequence(tok, cfg.teacher, r, 1 << 30, [s["char_end"] for s in rsteps], c,
                                   weights[r["rationale_id"]])
            ids, labels, loss_w = staged.ids, staged.labels, staged.weights
            assert ids == seq.ids
            first = next(j for j, lab in enumerate(labels) if lab != IGNORE)
            assert first <= spans[c][0] and tok.decode(ids[first:spans[c][0]]).strip() == ""   # the space before it at most
            assert first > (spans[c - 1][1] - 1 if c else 0)                                  # no input step carries loss
            assert loss_w[start:start + len(w)] == pytest.approx(w) and loss_w[item.rationale_end:] == [1.0] * (len(ids) - item.rationale_end)


def test_truncation_is_reported():
    from tasks.student import train_tokenizer

    tok = train_tokenizer(["Q: x\nA: go. He has 3 + 4 = 7 apples. So 7."] * 20, 300)
    assert not encode(tok, "Q: x\nA: go.", "He has 3 + 4 = 7 apples.", 1 << 10).truncated
    cut = encode(tok, "Q: x\nA: go.", "He has 3 + 4 = 7 apples.", 6)
    assert cut.truncated and len(cut.ids) == len(cut.labels) == len(cut.offsets) == 6


def test_sequence_mean_scale_keeps_the_weights_order_and_makes_their_mean_over_supervised_tokens_1(pipeline):
    cfg, cat, tok, rows, steps, kpod = pipeline
    weights = load_weights(cat, kpod["token_weights"])
    for r in rows[:6]:
        ends = [s["char_end"] for s in steps[r["rationale_id"]]]
        for c in range(len(ends)):
            seq = kpod_sequence(tok, cfg.teacher, r, 1 << 30, ends, c, weights[r["rationale_id"]])
            labels, raw = seq.labels, seq.weights
            scaled = kpod_sequence(tok, cfg.teacher, r, 1 << 30, ends, c, weights[r["rationale_id"]], "sequence_mean").weights
            supervised = [j for j, lab in enumerate(labels) if lab != IGNORE]
            assert sum(scaled[j] for j in supervised) / len(supervised) == pytest.approx(1.0)
            ratio = scaled[supervised[0]] / raw[supervised[0]]
            assert all(s == pytest.approx(x * ratio) for s, x in zip(scaled, raw))


def test_a_weight_floor_keeps_every_rationale_token_in_the_kpod_loss(tmp_path):
    from storage.workspace import Workspace
    from tasks.token_weights import load_weights
    from tests.tasks.helpers import kpod_prepared

    ws = Workspace(tmp_path)
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=8, epochs=2)
    from tasks.student import load_student
    _, tok = load_student(st.model_dir)
    weights = load_weights(cat, kpod["token_weights"])
    steps = {}
    for s in cat.query("steps_of_rationales", steps_fp=kpod["steps"].fp):
        steps.setdefault(s["rationale_id"], []).append(s["char_end"])
    for r in cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True):
        start, w = weights[r["rationale_id"]]
        raw = kpod_sequence(tok, cfg.teacher, r, 1 << 30, steps[r["rationale_id"]], 0, (start, w)).weights
        floored = kpod_sequence(tok, cfg.teacher, r, 1 << 30, steps[r["rationale_id"]], 0, (start, w), floor=0.5).weights
        assert floored[start:start + len(w)] == pytest.approx([0.5 + 0.5 * x for x in w])
        assert floored[:start] == raw[:start] and floored[start + len(w):] == raw[start + len(w):]   # answer: 1
