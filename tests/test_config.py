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
    from keystep.config import arm_config, load_experiment
    from tasks.ingest import load_examples

    pre = {ex.question for ex in load_examples(load_config(ROOT / "configs" / "pretrain-arith.yaml").data.train)[0]}
    for name in ("study-pretrained.yaml", "tune-pretrained.yaml", "study-teacher.yaml"):
        exp = load_experiment(ROOT / "configs" / name)
        assert exp.pretrain and exp.pretrain.endswith("pretrain-arith.yaml")
        for spec in arm_config(exp, next(iter(exp.variants)), exp.seeds[0]).data.eval:
            questions = {ex.question for ex in load_examples(spec)[0]}
            assert len(questions) >= 500 and not questions & pre, (name, len(questions & pre))


def test_r3s_teacher_never_trains_on_a_question_any_preset_tests_or_tunes_on():
    """configs/teacher-arith.yaml's training problems share no question with any evaluation set of any preset or
    experiment in configs/ (a teacher that saw the test set would teach it)."""
    from keystep.config import arm_config, load_experiment
    from tasks.ingest import load_examples

    teacher = load_config(ROOT / "configs" / "teacher-arith.yaml")
    taught = {ex.question for ex in load_examples(teacher.data.train)[0]}
    assert len(taught) >= 7900
    specs = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if "variants:" in path.read_text():
            exp = load_experiment(path)
            specs += arm_config(exp, next(iter(exp.variants)), exp.seeds[0]).data.eval
        elif path.name != "teacher-arith.yaml":
            specs += load_config(path).data.eval
    specs += teacher.data.eval
    synthetic = [s for s in specs if s.source.startswith("synthetic")]
    assert len(synthetic) >= 8
    for spec in synthetic:
        assert not {ex.question for ex in load_examples(spec)[0]} & taught, spec


# the dataset source and teacher backend are discriminated unions: each kind has its own fields, and the UI form
# offers the kinds to pick from; fingerprints are those of the flat models they replaced (no cache invalidated)
def test_each_source_and_backend_has_only_its_own_keys_and_says_so():
    from keystep.config import FileDatasetSpec, OpenAITeacherConfig, ReferenceTeacherConfig, build_config

    c = build_config({"data": {"train": {"name": "g", "source": "gsm8k", "path": "g.jsonl"}},
                      "teacher": {"backend": "openai", "base_url": "http://x/v1", "model": "m"}})
    assert isinstance(c.data.train, FileDatasetSpec) and isinstance(c.teacher, OpenAITeacherConfig)
    assert isinstance(build_config({}).teacher, ReferenceTeacherConfig)   # no backend: the offline default
    with pytest.raises(ConfigError, match=r"'data.train.n': not a setting of dataset sources gsm8k"):
        build_config({"data": {"train": {"source": "gsm8k", "path": "g.jsonl", "n": 5}}})
    with pytest.raises(ConfigError, match=r"'teacher.temperature': not a setting of teacher backend reference"):
        build_config({"teacher": {"backend": "reference", "temperature": 0.7}})
    with pytest.raises(ConfigError, match=r"needs 'model' and 'base_url'; set teacher.model, teacher.base_url"):
        build_config({"teacher": {"backend": "openai"}})
    with pytest.raises(ConfigError, match=r"source must be one of: synthetic:arith, gsm8k"):
        build_config({"data": {"train": {"source": "parquet"}}})


def test_a_config_saved_by_the_flat_models_still_loads():
    """A run's resolved config (table runs, a study file, an older prefect.yaml) named every kind's fields."""
    from keystep.config import build_config

    flat_teacher = {"backend": "reference", "model": None, "base_url": None, "api": "completions", "temperature": 0.0,
                    "concurrency": 16, "vllm_args": [], "cost_per_1k_prompt_tokens": None}
    flat_spec = {"name": "s", "source": "synthetic:arith", "path": None, "question_field": "question", "n": 50}
    c = build_config({"teacher": flat_teacher, "data": {"train": flat_spec}})
    assert c.teacher.backend == "reference" and c.data.train.n == 50


def test_the_unions_changed_no_fingerprint():
    """Values computed before the unions (c3bcab8's flat models): the demo's teacher, its datasets, an openai chat
    teacher, a gsm8k file spec."""
    from keystep.config import build_config
    from tasks.ingest import IngestInputs, dataset_lineage
    from tasks.teacher import teacher_fingerprint

    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert teacher_fingerprint(demo.teacher) == "teacher-974dca191da568f8"
    assert [dataset_lineage(demo, IngestInputs(spec=s)).fp for s in [demo.data.train, *demo.data.eval]] == \
        ["ingest-aab36277e65ea786", "ingest-1aede267e5466e0a"]
    openai = build_config({"teacher": {"backend": "openai", "base_url": "http://x/v1", "model": "m", "api": "chat",
                                       "temperature": 0.7, "n_samples": 3, "system_prompt": "s"}})
    assert teacher_fingerprint(openai.teacher) == "teacher-2c7ec5208a901ae2"
    files = build_config({"data": {"train": {"name": "g", "source": "gsm8k", "path": "/nonexistent/g.jsonl", "limit": 5}}})
    assert dataset_lineage(files, IngestInputs(spec=files.data.train)).fp == "ingest-e0c39591c62a322e"


def test_the_deployment_form_offers_each_source_and_backend():
    """Prefect's form renders `anyOf` as a choice of kinds (it reads no `oneOf`)."""
    from prefect.utilities.callables import parameter_schema

    from flows.distill import distill

    defs = parameter_schema(distill).model_dump()["definitions"]
    train, teacher = defs["DataConfig"]["properties"]["train"], defs["DistillConfig"]["properties"]["teacher"]
    assert [r["$ref"].rsplit("/", 1)[1] for r in train["anyOf"]] == ["SyntheticDatasetSpec", "FileDatasetSpec"]
    assert [r["$ref"].rsplit("/", 1)[1] for r in teacher["anyOf"]] == \
        ["ReferenceTeacherConfig", "OpenAITeacherConfig", "VLLMTeacherConfig"]
    assert "oneOf" not in str(defs) and "base_url" not in defs["ReferenceTeacherConfig"]["properties"]


def test_a_setting_added_later_changes_no_fingerprint_at_its_default():
    """train.token_weight_floor came after the train stage's fingerprints: at 0 (the old behaviour) the train stage
    hashes what it hashed before it existed; set, it is part of what the stage is."""
    from storage.fingerprint import canonical

    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert "token_weight_floor" not in canonical(demo.train)
    assert canonical(load_config(ROOT / "configs" / "demo.yaml", {"train.token_weight_floor": 0.5}).train)[
        "token_weight_floor"] == 0.5


def test_help_text_shows_angle_brackets_in_the_ui():
    """The deployment form renders field descriptions as markdown: a `<workspace>` outside a code span is an HTML tag
    and vanishes ("/exports/."), so every placeholder in angle brackets sits in backticks."""
    import re

    from pydantic import BaseModel

    from keystep.config import DistillConfig, ExperimentConfig

    seen, bad = set(), []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            prose = re.sub(r"`[^`]*`", "", field.description or "")
            if re.search(r"<[A-Za-z]", prose):
                bad.append(f"{model.__name__}.{name}")
            for kind in getattr(field.annotation, "__args__", ()) + (field.annotation,):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    walk(kind)
                for inner in getattr(kind, "__args__", ()):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner)

    walk(DistillConfig)
    walk(ExperimentConfig)
    assert len(seen) > 10 and not bad, bad


def test_the_form_lists_what_most_runs_change_first():
    from keystep.config import DistillConfig, TrainConfig

    sections = list(DistillConfig.model_fields)
    assert sections[:5] == ["data", "teacher", "train", "student", "eval"]
    assert sections.index("train") < min(sections.index(k) for k in ("steps", "token_weights", "difficulty", "curriculum"))
    assert list(TrainConfig.model_fields)[:3] == ["loss", "target_format", "epochs"]


def test_a_teacher_preset_is_every_arms_teacher_and_the_scorer_of_the_arms_that_read_scores(tmp_path):
    """`teacher_preset`: its trained folder becomes teacher.model of every arm, and teacher_scores.model of those whose
    loss reads teacher distributions only (a std_cot arm scores nothing); the preset's path stands in until trained."""
    from keystep.config import arm_config, load_experiment

    spec = tmp_path / "exp.yaml"
    spec.write_text(f"""
name: teacher
base: {ROOT / 'configs' / 'micro.yaml'}
teacher_preset: {ROOT / 'configs' / 'micro.yaml'}
overrides: {{teacher: {{backend: openai, model: x, base_url: "http://127.0.0.1:9/v1"}}}}
variants: {{std_cot: {{}}, kd: {{train.loss: kd}}}}
seeds: [0]
""")
    exp = load_experiment(spec)
    for variant, scored in (("std_cot", False), ("kd", True)):
        before, after = arm_config(exp, variant, 0), arm_config(exp, variant, 0, teacher_model="/m/teacher")
        assert before.teacher.model == exp.teacher_preset and after.teacher.model == "/m/teacher"
        assert after.teacher_scores.model == ("/m/teacher" if scored else None)


def test_the_committed_packs_are_the_train_stages_their_presets_make():
    """docs/studies/packs holds the studies' fixed models (R2's pretrained student, R3's teacher) so a fresh machine
    unpacks them instead of training them; a keystep change that moves their train fingerprint must be seen here."""
    import json

    from flows.phases import planned_run
    from storage.fingerprint import canonical
    from tasks.carry import MANIFEST
    from tasks.train import CODE_VERSION

    packs = ROOT / "docs" / "studies" / "packs"
    pretrain = json.loads((packs / "pretrain-arith" / MANIFEST).read_text())
    assert pretrain["fingerprint"] == planned_run(load_config(ROOT / "configs" / "pretrain-arith.yaml")).lineages["train"].fp
    for name in sorted(p.name for p in packs.iterdir()):
        manifest = json.loads((packs / name / MANIFEST).read_text())
        config = load_config(ROOT / manifest["preset"])
        # upstream fingerprints aside (the teacher's tokenizer is the pretrained student's, made by running it)
        assert manifest["lineage"]["config"] == canonical(config.train)
        assert manifest["lineage"]["code_version"] == CODE_VERSION
