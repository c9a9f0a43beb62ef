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
