import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def keystep(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=None if env is None else {**os.environ, **env})


BUSY = "import time\nt = time.time() + 600\nwhile time.time() < t: pass"


@pytest.mark.slow
def test_first_run_on_a_fresh_machine_with_busy_cores_starts_prefect(tmp_path):
    """An empty PREFECT_HOME (Prefect's temporary server must create its database) while two processes keep both
    cores busy: the run still starts and finishes."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        r = keystep("run", "configs/micro.yaml", "--set", "train.epochs=1", "--workspace", str(tmp_path / "ws"),
                    env={"PREFECT_HOME": str(tmp_path / "prefect-home")})
    finally:
        for p in busy:
            p.kill()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "accuracy" in r.stdout and (tmp_path / "prefect-home").is_dir()


def test_a_server_that_does_not_start_in_time_is_one_line_with_what_to_do(tmp_path):
    r = keystep("run", "configs/micro.yaml", "--workspace", str(tmp_path / "ws"),
                env={"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("keystep: error:")]
    assert len(errors) == 1
    assert "temporary server did not start within 1 s" in errors[0] and "PREFECT_API_URL" in errors[0]


def test_an_unreachable_configured_server_is_one_line(tmp_path):
    r = keystep("run", "configs/micro.yaml", "--workspace", str(tmp_path / "ws"),
                env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not answer" in r.stderr and "make serve" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


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
    assert second.stdout == first.stdout and "temporary server on http" not in second.stderr
    changed = keystep(*args, "--set", "train.lr=0.001")                 # a stage to run: through Prefect again
    assert changed.returncode == 0 and "temporary server on http" in changed.stderr
    with duckdb.connect(str(tmp_path / "ws" / "catalog.duckdb"), read_only=True) as con:
        runs = con.execute("select run_id, flow_run_id, status from runs order by started_at").fetchall()
    assert [r[2] for r in runs] == ["completed"] * 3
    assert runs[1][0].startswith("catalog-") and runs[1][1] is None and runs[2][1] is not None


@pytest.mark.slow
def test_two_runs_at_once_on_one_workspace_both_end_cleanly_with_nothing_duplicated(tmp_path):
    """One waits for the other (saying so) and then finds its stages cached: same results, no duplicate row."""
    from storage.catalog import Catalog
    from tests.flows.test_chaos import UNIQUE

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    cmd = [sys.executable, "-m", "flows.cli", "run", "configs/micro.yaml", "--set", "train.epochs=1",
           "--workspace", str(tmp_path / "ws")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-1500:] + outs[1][-1500:]
    tables = [re.search(r"^dataset +split.*?(?=^report:)", o, re.M | re.S).group(0) for o in outs]
    assert tables[0] == tables[1]
    assert sum("is in use by" in o for o in outs) == 1                  # the second one said whom it waited for
    cat = Catalog(tmp_path / "ws" / "catalog.duckdb")
    for table, key in UNIQUE.items():
        assert not cat.execute(f"select {key}, count(*) from {table} group by all having count(*) > 1"), table
    assert sorted(r["status"] for r in cat.execute("select status from runs")) == ["completed", "completed"]
    assert cat.execute("select count(*) as n from stage_outputs where stage = 'train'")[0]["n"] == 1
