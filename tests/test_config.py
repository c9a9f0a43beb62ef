from pathlib import Path

import pytest

from keystep.config import ConfigError, DistillConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    import yaml

    from keystep.config import ExperimentConfig, load_experiment
    if "variants" in yaml.safe_load(preset.read_text()):   # an experiment grid: every arm's config must build
        assert isinstance(load_experiment(preset), ExperimentConfig)
    else:
        assert isinstance(load_config(preset), DistillConfig)


def test_presets_exist():
    assert {"demo.yaml", "kpod.yaml", "gsm8k.yaml", "micro.yaml"} <= {p.name for p in PRESETS}


def test_default_is_the_offline_demo():
    cfg = DistillConfig()
    assert cfg.data.train.source == "synthetic:arith"
    assert cfg.teacher.backend == "reference"
    assert cfg.student.model == "scratch"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz.*unknown key"):
        load_config(p)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, {"train.epochs": 0})
    with pytest.raises(ConfigError, match=r"student.*divisible"):
        load_config(None, {"student.hidden_size": 30, "student.num_heads": 4})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_apply_dotted_keys():
    cfg = load_config(None, {"train.epochs": 3, "data.train.n": 10})
    assert cfg.train.epochs == 3 and cfg.data.train.n == 10


def test_file_source_needs_path():
    with pytest.raises(ConfigError, match="needs 'path'"):
        load_config(None, {"data.train": {"source": "gsm8k"}})


def test_experiment_with_a_bad_arm_names_the_variant(tmp_path):
    from keystep.config import load_experiment
    bad = tmp_path / "exp.yaml"
    bad.write_text(f"base: {ROOT / 'configs' / 'micro.yaml'}\nvariants:\n  good: {{}}\n  broken: {{train.lr: -1}}\n")
    with pytest.raises(ConfigError, match="variant 'broken'.*train.lr"):
        load_experiment(bad)


def test_the_pretrained_students_data_never_meets_the_kpod_studys_test_or_validation_questions():
    """R2's pretrained student (configs/pretrain-arith.yaml) must not have seen a question it is tested or tuned on."""
    from keystep.config import load_experiment
    from tasks.ingest import load_examples

    pre = {ex.question for ex in load_examples(load_config(ROOT / "configs" / "pretrain-arith.yaml").data.train)[0]}
    for name in ("study-pretrained.yaml", "tune-pretrained.yaml"):
        exp = load_experiment(ROOT / "configs" / name)
        assert exp.pretrain and exp.pretrain.endswith("pretrain-arith.yaml")
        for spec in load_config(exp.base, exp.overrides).data.eval:
            questions = {ex.question for ex in load_examples(spec)[0]}
            assert len(questions) >= 500 and not questions & pre, (name, len(questions & pre))
