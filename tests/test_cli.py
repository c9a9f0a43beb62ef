import subprocess
import sys

import pytest

from tests.conftest import ROOT


def keystep(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_unknown_key_exits_2_with_one_line():
    r = keystep("run", "configs/micro.yaml", "--set", "train.epochz=3")
    assert r.returncode == 2
    assert "train.epochz" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_config_file():
    r = keystep("run", "configs/nope.yaml")
    assert r.returncode == 2 and "configs/nope.yaml" in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_file_named_before_any_work(tmp_path):
    r = keystep("run", "configs/micro.yaml", "--set", "data.train={source: file, path: /no/such.jsonl}",
                "--workspace", str(tmp_path / "ws"))
    assert r.returncode == 2
    assert "data.train.path" in r.stderr and "/no/such.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ws" / "catalog.duckdb").exists()


def test_bad_set_syntax():
    r = keystep("run", "configs/micro.yaml", "--set", "train.epochs")
    assert r.returncode == 2 and "section.key=value" in r.stderr


def test_results_without_catalog(tmp_path):
    r = keystep("results", "--workspace", str(tmp_path))
    assert r.returncode == 2 and "no catalog" in r.stderr


def test_config_prints_resolved_yaml():
    r = keystep("config", "configs/demo.yaml", "--set", "train.epochs=2")
    assert r.returncode == 0 and "epochs: 2" in r.stdout


def test_experiment_file_with_bad_yaml_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("name: x\nvariants: {a: {train.epochs: 1}\n")     # unclosed mapping
    r = keystep("experiment", str(bad))
    assert r.returncode == 2 and str(bad) in r.stderr and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_the_old_masks_section_names_its_new_name():
    r = keystep("config", "configs/micro.yaml", "--set", "masks.uniform=true")
    assert r.returncode == 2 and "'masks'" in r.stderr and "token_weights" in r.stderr


@pytest.mark.slow
def test_a_rerun_with_every_stage_cached_is_read_from_the_catalog_and_recorded(tmp_path):
    """No Prefect server configured: the second run starts none, prints the same results and is still recorded."""
    import duckdb

    args = ["run", "configs/micro.yaml", "--workspace", str(tmp_path / "ws"), "--set", "train.epochs=1"]
    first, second = keystep(*args), keystep(*args)
    assert first.returncode == second.returncode == 0
    assert second.stdout == first.stdout and "Starting temporary server" not in second.stderr
    changed = keystep(*args, "--set", "train.lr=0.001")                 # a stage to run: through Prefect again
    assert changed.returncode == 0 and "Starting temporary server" in changed.stderr
    with duckdb.connect(str(tmp_path / "ws" / "catalog.duckdb"), read_only=True) as con:
        runs = con.execute("select run_id, flow_run_id, status from runs order by started_at").fetchall()
    assert [r[2] for r in runs] == ["completed"] * 3
    assert runs[1][0].startswith("catalog-") and runs[1][1] is None and runs[2][1] is not None
