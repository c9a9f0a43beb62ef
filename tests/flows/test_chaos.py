"""Chaos: `keystep run` killed with SIGKILL at random points (its whole process group: the CLI and the Prefect
server it started), then run again. The rerun's predictions equal an uninterrupted run's, and the catalog holds no
duplicate or partial rows."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

KILLS = 5
UNIQUE = {   # table -> the columns that identify a row
    "stage_outputs": "fingerprint", "datasets": "dataset_fp", "examples": "dataset_fp, example_id",
    "rationales": "rationale_id", "steps": "steps_fp, rationale_id, step_index",
    "checkpoints": "train_fp, epoch", "eval_results": "eval_fp, model_label, dataset, split, group_key, group_value",
    "predictions": "eval_fp, model_label, dataset, example_id",
}


def start(workspace):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(ROOT / "configs" / "micro.yaml"),
                             "--workspace", str(workspace), "--set", "train.epochs=3"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def predictions(workspace):
    from storage.catalog import Catalog

    return Catalog(workspace / "catalog.duckdb").execute(
        "select model_label, example_id, output, correct from predictions order by all")


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_equals_an_uninterrupted_run(tmp_path):
    t0 = time.monotonic()
    assert start(tmp_path / "clean").wait(timeout=600) == 0
    clean_s = time.monotonic() - t0
    rng = random.Random(0)
    killed, attempts = 0, 0
    # each rerun resumes further, so the points move through the DAG; early points (the Prefect server's start
    # included), since on a loaded machine a mostly cached rerun can finish before a late one
    while killed < KILLS and attempts < 6 * KILLS:
        attempts += 1
        proc = start(tmp_path / "chaos")
        try:
            proc.wait(timeout=rng.uniform(0.1, 0.45) * clean_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
    assert killed == KILLS
    assert start(tmp_path / "chaos").wait(timeout=600) == 0
    assert predictions(tmp_path / "chaos") == predictions(tmp_path / "clean")
    from storage.catalog import Catalog

    cat = Catalog(tmp_path / "chaos" / "catalog.duckdb")
    for table, key in UNIQUE.items():
        dupes = cat.execute(f"select {key}, count(*) as n from {table} group by all having count(*) > 1")
        assert not dupes, f"duplicate rows in {table}: {dupes[:3]}"
    assert not list((tmp_path / "chaos").rglob(".tmp-*"))               # no half-written folder left published
    runs = cat.execute("select status from runs")       # the killed runs say so: none is left 'running'
    assert runs and all(r["status"] in ("completed", "killed") for r in runs), runs
    assert sum(r["status"] == "completed" for r in runs) == 1
