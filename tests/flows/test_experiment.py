"""The experiment flow on micro arms through a real (temporary) Prefect server: shared upstream stages run once,
the comparison table, plot and markdown report come out, every run leaves its study files, and a finished run is
not run again."""
import json

import pytest

from keystep.config import ConfigError

from tests.conftest import ROOT
from tests.flows.test_distill import stage_runs


@pytest.mark.slow
def test_grid_shares_upstream_and_writes_the_comparison(prefect_api, tmp_path):
    import shutil

    from flows.experiment import experiment
    from keystep.config import load_experiment
    from tasks.compare import study_report

    spec = tmp_path / "configs" / "exp.yaml"
    spec.parent.mkdir()
    spec.write_text(f"""
name: micro grid
base: {ROOT / 'configs' / 'micro.yaml'}
overrides: {{storage.workspace: {tmp_path / 'ws'}, train.epochs: 1}}
variants:
  std_cot: {{}}
  label_then_cot: {{train.target_format: label_then_cot}}
seeds: [0, 1]
results_path: {tmp_path / 'docs' / 'results.md'}
gaps: [[std_cot, label_then_cot]]
""")
    _, seen = stage_runs(set())   # task runs of earlier tests on this server
    exp = load_experiment(spec)
    assert exp.study_dir == str(tmp_path / "docs" / "studies" / "exp")      # beside the experiment file's repo
    out = experiment(config=exp)
    counts, seen = stage_runs(seen)
    assert counts["executed"].count("generate") == 1      # shared upstream: generated once
    assert counts["executed"].count("student") == 1
    assert counts["executed"].count("train") == 4           # 2 variants x 2 seeds
    assert len(out.runs) == 4 and len({r["train_fp"] for r in out.runs}) == 4
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| std_cot | 2 |" in text and "| label_then_cot | 2 |" in text and "±" in text
    assert "synthetic/test" in out.columns and "seed spread" in text and "by number of steps" in text
    assert (tmp_path / "docs" / "results-exp.png").read_bytes()[:4] == b"\x89PNG"
    # each run's files: its summary and one prediction per test question
    study = tmp_path / "docs" / "studies" / "exp"
    summary = json.loads((study / "std_cot" / "seed-1.json").read_text())
    assert summary["accuracy"]["student/synthetic/test"] == out.runs[1]["accuracy"]["student/synthetic/test"]
    assert len(summary["history"]) == 1 and summary["supervised_tokens"] > 0
    assert len((study / "std_cot" / "seed-1.predictions.csv").read_text().splitlines()) == 1 + 16

    # a rerun runs no arm; the report comes back from the files alone, with the workspace gone
    experiment(config=load_experiment(spec))
    counts, _ = stage_runs(seen)
    assert "train" not in counts["executed"] and "ingest" not in counts["executed"] + counts["cached"]
    shutil.rmtree(tmp_path / "ws")
    (tmp_path / "docs" / "results.md").unlink()
    again = study_report(load_experiment(spec))
    assert again["markdown"] == out.markdown and not again["missing"]

    # a changed arm is refused rather than mixed with the old files
    spec.write_text(spec.read_text().replace("train.epochs: 1", "train.epochs: 2"))
    with pytest.raises(ConfigError, match="another config"):
        study_report(load_experiment(spec))


@pytest.mark.slow
def test_pretrained_student_is_trained_once_and_every_arm_starts_from_it(prefect_api, tmp_path):
    from flows.experiment import experiment
    from keystep.config import arm_config, load_experiment

    spec = tmp_path / "exp.yaml"
    spec.write_text(f"""
name: micro pretrained
base: {ROOT / 'configs' / 'micro.yaml'}
pretrain: {tmp_path / 'pre.yaml'}
overrides: {{storage.workspace: {tmp_path / 'ws'}, train.epochs: 1, data.train.seed: 5}}
variants: {{std_cot: {{}}}}
seeds: [0, 1]
study_dir: {tmp_path / 'study'}
""")
    (tmp_path / "pre.yaml").write_text((ROOT / "configs" / "micro.yaml").read_text().replace(
        ".keystep-micro", str(tmp_path / "pre-ws")).replace("epochs: 2", "epochs: 1"))
    _, seen = stage_runs(set())
    out = experiment(config=load_experiment(spec))
    counts, _ = stage_runs(seen)
    assert counts["executed"].count("train") == 3            # the pretrained student once, then 2 arms
    pre = next((tmp_path / "pre-ws" / "checkpoints").glob("*/epoch-1"))
    for run in out.runs:
        saved = json.loads((tmp_path / "ws" / "checkpoints" / run["train_fp"] / "epoch-1" / "keystep_config.json").read_text())
        assert saved["student"]["model"] == str(pre)
    assert arm_config(load_experiment(spec), "std_cot", 0).student.model == "scratch"   # until pretrain has run


@pytest.mark.slow
def test_gsm8k_preset_trains_and_evaluates_out_of_distribution_at_micro_scale(prefect_api, tmp_path):
    """The real-data path: GSM8K (reference teacher) -> scratch student -> GSM8K test and SVAMP."""
    from flows.distill import distill
    from keystep.config import load_config
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    small = {"student.vocab_size": 400, "student.hidden_size": 32, "student.num_layers": 1, "student.num_heads": 2,
             "student.intermediate_size": 64, "student.max_length": 640, "train.epochs": 1, "eval.max_new_tokens": 16}
    cfg = load_config(ROOT / "configs" / "gsm8k.yaml", {
        **small, "storage.workspace": str(tmp_path / "ws"),
        "data.train.path": str(SHARED_DATA / "gsm8k/train.jsonl"), "data.train.limit": 48,
        "data.eval": [{"name": "gsm8k", "source": "gsm8k", "path": str(SHARED_DATA / "gsm8k/test.jsonl"), "split": "test", "limit": 16},
                      {"name": "svamp", "source": "svamp", "path": str(SHARED_DATA / "svamp/SVAMP.json"), "split": "test", "limit": 16}]})
    out = distill(config=cfg)
    assert {"student/gsm8k/test", "student/svamp/test", "untrained/svamp/test"} <= set(out.accuracy)
    assert all(0.0 <= v <= 1.0 for v in out.accuracy.values())
