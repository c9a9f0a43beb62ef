import json

import pytest

from tests.conftest import ROOT


def write_dataset(path, n, offset=0):
    rows = [{"question": f"Ann has {i} pens and buys 2 more. How many pens?", "answer": str(i + 2),
             "rationale": f"She has {i} + 2 = {i + 2} pens."} for i in range(offset, offset + n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.slow
def test_scan_runs_new_and_changed_datasets_once(prefect_api, tmp_path):
    from flows.rerun import rerun_new_datasets
    from storage.workspace import Workspace

    reg = tmp_path / "registry"
    reg.mkdir()
    write_dataset(reg / "a.jsonl", 24)
    write_dataset(reg / "b.jsonl", 24, offset=100)
    (reg / "notes.txt").write_text("not a dataset")
    overrides = {"storage.workspace": str(tmp_path / "ws"), "train.epochs": 1,
                 "data.train": {"source": "file", "path": "unused", "rationale_field": "rationale"}}
    preset = str(ROOT / "configs" / "micro.yaml")

    first = rerun_new_datasets(preset=preset, registry_dir=str(reg), overrides=overrides)
    assert sorted(first["started"]) == [str(reg / "a.jsonl"), str(reg / "b.jsonl")]

    second = rerun_new_datasets(preset=preset, registry_dir=str(reg), overrides=overrides)
    assert second["started"] == [] and len(second["skipped"]) == 2  # idempotent

    write_dataset(reg / "b.jsonl", 26, offset=100)  # a new version of b: 2 more questions
    third = rerun_new_datasets(preset=preset, registry_dir=str(reg), overrides=overrides)
    assert third["started"] == [str(reg / "b.jsonl")]

    cat = Workspace(tmp_path / "ws").catalog()
    assert [r["status"] for r in cat.execute("select status from runs")] == ["completed"] * 3
    assert cat.execute("select count(*) as n from registry_scans where status = 'completed'")[0]["n"] == 3
    # b's new version reused b's stored rationales: 24 + 2 rationales for b, 24 for a
    assert cat.execute("select count(*) as n from rationales")[0]["n"] == 24 + 26 - 24 + 24


@pytest.mark.slow
def test_a_registry_folder_that_is_not_there_is_one_log_line_not_a_crashed_run(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.rerun import rerun_new_datasets
    from tests.conftest import ROOT

    state = rerun_new_datasets(preset=str(ROOT / "configs" / "micro.yaml"), registry_dir=str(tmp_path / "nowhere"),
                               overrides={"storage.workspace": str(tmp_path / "ws")}, return_state=True)
    assert state.is_completed() and state.result() == {"started": [], "skipped": []}
    from prefect.logging.handlers import APILogWorker
    APILogWorker.drain_all(timeout=10)                          # logs reach the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    said = [log.message for log in logs if "does not exist: nothing to scan" in log.message]
    assert len(said) == 1 and log_level(logs, said[0]) == 30     # one warning line


def test_the_repository_has_the_folder_the_hourly_scan_reads():
    from tests.conftest import ROOT

    assert (ROOT / "datasets" / "README.md").is_file()


def log_level(logs, message):
    return next(log.level for log in logs if log.message == message)
