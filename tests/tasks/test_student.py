import pytest

from keystep.config import StudentConfig
from storage.workspace import Workspace
from tasks.student import init_student, load_student, student_fingerprint


def test_scratch_student_is_a_normal_hf_folder(tmp_path):
    ws = Workspace(tmp_path)
    cfg = StudentConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    fp = student_fingerprint(cfg, "gen-x")
    s = init_student(ws.catalog(), cfg, ["Tom has 3 apples. 3 + 4 = 7."] * 10, ws.model_dir(fp), fp)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    tok = AutoTokenizer.from_pretrained(s["model_dir"])
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok.decode(tok("3 + 4 = 7")["input_ids"], skip_special_tokens=True) == "3 + 4 = 7"
    assert s["n_params"] == sum(p.numel() for p in model.parameters())


def test_any_hf_causal_lm_by_path(tmp_path):
    ws = Workspace(tmp_path)
    scratch = StudentConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    fp = student_fingerprint(scratch, "gen-x")
    path = init_student(ws.catalog(), scratch, ["a b c 1 2 3"] * 10, ws.model_dir(fp), fp)["model_dir"]
    cfg = StudentConfig(model=path)
    fp2 = student_fingerprint(cfg, "gen-x")
    assert fp2 == student_fingerprint(cfg, "gen-y")  # a pretrained student does not depend on the corpus
    s = init_student(ws.catalog(), cfg, [], ws.model_dir(fp2), fp2)
    assert s["model_dir"] == path
    model, tok = load_student(path)
    assert tok.pad_token is not None


def test_unloadable_model_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="student.model"):
        load_student(tmp_path / "no-model-here")
