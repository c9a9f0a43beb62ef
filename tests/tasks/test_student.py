from pathlib import Path

import pytest

from storage.workspace import Workspace
from tasks.student import STUDENT, StudentInputs, load_student, student_lineage
from tests.tasks.helpers import prepared


def with_student(cfg, **update):
    return cfg.model_copy(update={"student": cfg.student.model_copy(update=update)})


def test_scratch_student_is_a_normal_hf_folder(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, s = prepared(ws, n=16)    # micro: vocab 300, hidden 32, 1 layer, 2 heads
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(s.model_dir)
    tok = AutoTokenizer.from_pretrained(s.model_dir)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok.decode(tok("3 + 4 = 7")["input_ids"], skip_special_tokens=True) == "3 + 4 = 7"
    assert s.n_params == sum(p.numel() for p in model.parameters())


def test_any_hf_causal_lm_by_path(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, scratch = prepared(ws, n=16)
    path = scratch.model_dir
    pretrained = with_student(cfg, model=path)
    other_gen = gen.model_copy(update={"fp": "generate-y"})
    # a pretrained student does not depend on the corpus
    assert student_lineage(pretrained, StudentInputs(
        generation=gen)).fp == student_lineage(pretrained, StudentInputs(generation=other_gen)).fp
    assert student_lineage(cfg, StudentInputs(
        generation=gen)).fp != student_lineage(cfg, StudentInputs(generation=other_gen)).fp
    s = STUDENT.run(ws, pretrained, StudentInputs(generation=gen))
    assert s.model_dir == path
    model, tok = load_student(path)
    assert tok.pad_token is not None


def test_unloadable_model_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="student.model"):
        load_student(tmp_path / "no-model-here")


def test_a_scratch_model_can_share_another_students_tokenizer(tmp_path):
    """`student.tokenizer`: a teacher built to share its student's vocabulary (logit distillation) — same token ids
    for the same text, its own width, and no dependence on the corpus the other tokenizer was trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.preflight import preflight
    from keystep.config import ConfigError

    ws = Workspace(tmp_path / "ws")
    cfg, cat, gen, student = prepared(ws, n=16)
    wide = with_student(cfg, tokenizer=student.model_dir, hidden_size=64, num_heads=1, vocab_size=400)
    other_gen = gen.model_copy(update={"fp": "generate-y"})
    assert student_lineage(wide, StudentInputs(generation=gen)).fp == \
        student_lineage(wide, StudentInputs(generation=other_gen)).fp
    teacher = STUDENT.run(ws, wide, StudentInputs(generation=gen))
    assert teacher.fp != student.fp
    ours, theirs = AutoTokenizer.from_pretrained(student.model_dir), AutoTokenizer.from_pretrained(teacher.model_dir)
    text = "Tom has 3 apples and buys 4 more. 3 + 4 = 7. The answer is 7."
    assert theirs(text)["input_ids"] == ours(text)["input_ids"] and len(theirs) == len(ours)
    model = AutoModelForCausalLM.from_pretrained(teacher.model_dir)
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(ours)   # not the 400 asked of a BPE
    # by preset: the scratch student that preset makes, found by its fingerprint
    import yaml

    from tasks.student import tokenizer_folder
    preset = tmp_path / "student.yaml"
    preset.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert tokenizer_folder(str(preset)) == Path(student.model_dir)
    assert STUDENT.run(ws, with_student(wide, tokenizer=str(preset)), StudentInputs(generation=gen)).fp == teacher.fp
    with pytest.raises(ConfigError, match="student.tokenizer"):
        preflight(with_student(cfg, tokenizer=str(tmp_path / "nothing")), check_teacher_endpoint=False)
    unmade = tmp_path / "unmade.yaml"
    unmade.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "storage": {"workspace": str(tmp_path / "new")}}))
    with pytest.raises(ConfigError, match="keystep run .*unmade.yaml` makes it"):
        preflight(with_student(cfg, tokenizer=str(unmade)), check_teacher_endpoint=False)
    with pytest.raises(ValueError, match="student.tokenizer applies to a scratch model"):
        type(cfg.student).model_validate({**cfg.student.model_dump(), "model": "x", "tokenizer": student.model_dir})
