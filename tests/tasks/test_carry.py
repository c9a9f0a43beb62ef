"""Carrying a trained student to another machine: `planned_run` computes every fingerprint a run makes without
running anything; a pack unpacked into another workspace is that run's train output there — nothing is trained
again and the student answers exactly as where it was trained; a pack that does not fit says what differs."""
import json
import shutil
import subprocess
import sys

import pytest

from flows.phases import evaluate_stages, generate_stages, planned_run, prepare_stages, train_stages
from keystep.config import ConfigError
from storage.workspace import Workspace
from tasks import teacher
from tasks.carry import MANIFEST, pack_trained, unpack_trained
from tasks.student import student_folder
from tasks.train import TRAIN
from tasks.training import TrainInputs
from tests.conftest import ROOT, micro_config


class RunHere:
    """The phases' stages run in this process (no Prefect), each through its one cache (`Stage.run`)."""

    def __init__(self, ws):
        self.ws = ws

    def __call__(self, stage, config, inputs):
        return stage.run(self.ws, config, inputs)

    def teacher(self, config, dataset):
        return teacher.generate_rationales(self.ws, config, dataset)

    def report(self, config, evaluation, t):
        return ""


def run_to_evaluation(root, **overrides):
    config = micro_config(root, **{"train.epochs": 1, **overrides})
    run = RunHere(Workspace(root))
    out = evaluate_stages(config, train_stages(config, prepare_stages(config, generate_stages(config, run), run), run),
                          run)
    return config, out


def predictions(ws, eval_fp):
    return sorted((r["example_id"], r["model_label"], r["output"])
                  for r in ws.catalog().execute("select * from predictions where eval_fp = ?", [eval_fp]))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A micro run trained in one workspace and packed."""
    root = tmp_path_factory.mktemp("carry")
    config, out = run_to_evaluation(root / "here")
    lineage = planned_run(config).lineages["train"]
    manifest = pack_trained(Workspace(root / "here"), lineage, root / "pack", "micro")
    return root, config, out, manifest


def test_the_planned_fingerprints_are_the_ones_the_run_makes(packed):
    _, config, out, _ = packed
    plan = planned_run(config).lineages
    assert plan["ingest"].fp == out.eval_datasets[-1].fp        # the last dataset ingested: the evaluation set
    assert plan["generate"].fp == out.generation.fp and plan["student"].fp == out.student.fp
    assert plan["steps"].fp == out.steps.fp and plan["train"].fp == out.trained.fp


def unpack_into(ws_root, pack, **overrides):
    config = micro_config(ws_root, **{"train.epochs": 1, **overrides})
    plan = planned_run(config).lineages
    ws = Workspace(ws_root)
    return unpack_trained(ws, config, plan["train"], student_folder(ws, config, plan["student"].fp), pack, "micro")


def test_an_unpacked_student_trains_nothing_and_answers_as_where_it_was_trained(packed, tmp_path, monkeypatch):
    root, config, here, manifest = packed
    assert "trainer_state.pt" not in manifest["files"] and "model.safetensors" in manifest["files"]
    trained, recorded = unpack_into(tmp_path / "there", root / "pack")
    assert recorded and trained.fp == here.trained.fp and trained.history == here.trained.history
    assert trained.final_dir == str(Workspace(tmp_path / "there").checkpoint_dir(trained.fp, 1))
    assert unpack_into(tmp_path / "there", root / "pack")[1] is False          # a second unpack: already there

    import tasks.train
    monkeypatch.setattr(tasks.train, "run_training", lambda *a, **k: pytest.fail("trained again"))
    _, there = run_to_evaluation(tmp_path / "there")
    assert there.trained == trained and there.evaluation.fp == here.evaluation.fp
    assert predictions(Workspace(tmp_path / "there"), there.evaluation.fp) == \
        predictions(Workspace(root / "here"), here.evaluation.fp)
    rows = Workspace(tmp_path / "there").catalog().query("checkpoints_of", train_fp=trained.fp)
    assert [(r["epoch"], r["path"]) for r in rows] == [(1, trained.final_dir)]


def test_a_pack_of_another_config_names_what_differs_and_records_nothing(packed, tmp_path):
    root, *_ = packed
    with pytest.raises(ConfigError, match=r"train\.lr: packed 0\.003, here 0\.01") as err:
        unpack_into(tmp_path / "there", root / "pack", **{"train.lr": 0.01})
    assert "packed from micro" in str(err.value)
    with pytest.raises(ConfigError, match="upstream outputs .* the data, the teacher or the student"):
        unpack_into(tmp_path / "there", root / "pack", **{"data.train.n": 60})
    assert not Workspace(tmp_path / "there").catalog().execute("select * from stage_outputs")


def test_a_pack_cut_short_or_changed_is_refused_by_file(packed, tmp_path):
    root, *_ = packed
    broken = tmp_path / "broken"
    shutil.copytree(root / "pack", broken)
    (broken / "model" / "model.safetensors").write_bytes((broken / "model" / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ConfigError, match="model.safetensors': not the file that was packed"):
        unpack_into(tmp_path / "there", broken)
    (broken / "model" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors': missing"):
        unpack_into(tmp_path / "there", broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ConfigError, match="pack format 99"):
        unpack_into(tmp_path / "there", broken)
    assert not Workspace(tmp_path / "there").catalog().execute("select * from stage_outputs")


def test_a_pack_replaces_an_earlier_pack_but_never_other_files(packed, tmp_path):
    root, config, *_ = packed
    lineage = planned_run(config).lineages["train"]
    again = pack_trained(Workspace(root / "here"), lineage, root / "pack", "micro")
    assert again["files"] == json.loads((root / "pack" / MANIFEST).read_text())["files"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="other files in it"):
        pack_trained(Workspace(root / "here"), lineage, tmp_path / "mine", "micro")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_commands_pack_and_unpack_as_a_user_types_them(packed, tmp_path):
    root, config, here, _ = packed

    def keystep(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--set", "train.epochs=1"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    r = keystep("pack", "configs/micro.yaml", str(tmp_path / "pack"), "--workspace", str(root / "here"))
    assert r.returncode == 0 and f"packed train stage {here.trained.fp} (" in r.stdout, r.stderr[-2000:]
    r = keystep("unpack", "configs/micro.yaml", str(tmp_path / "pack"), "--workspace", str(tmp_path / "there"))
    assert r.returncode == 0 and f"unpacked train stage {here.trained.fp}" in r.stdout, r.stderr[-2000:]
    there = micro_config(tmp_path / "there", **{"train.epochs": 1})
    assert TRAIN.from_catalog(there, TrainInputs.model_construct(generation=here.generation, student=here.student)) \
        .final_dir.startswith(str(tmp_path / "there"))
