"""Scheduled reruns on new datasets, as a user gets them: the real `rerun-new-datasets` deployment of prefect.yaml,
on a short interval, gets its runs from the server's own scheduler service (no run is created by hand), a process
worker runs one to completion, and the server's log has no traceback (SQLAlchemy 2.1 made the scheduler fail every
minute with `Can't evaluate bulk DML statement` and create nothing) but SQLite's transient `database is locked`."""
import json
import time

import pytest

from tests.flows.prefect_server import PrefectServer


def runs_of(server: PrefectServer, deployment_id: str, states: tuple[str, ...] = ()) -> list[dict]:
    """The deployment's runs, only those in `states` if given (the scheduler makes ~100 ahead: keep replies small)."""
    runs = {"deployment_id": {"any_": [deployment_id]}}
    if states:
        runs["state"] = {"type": {"any_": list(states)}}
    return server.post("flow_runs/filter", {"flow_runs": runs})


@pytest.mark.slow
def test_an_interval_schedule_gets_runs_from_the_server_scheduler_and_a_worker_runs_one(tmp_path):
    registry, ws = tmp_path / "registry", tmp_path / "ws"
    registry.mkdir()     # an empty registry: each scheduled scan finds nothing new and starts nothing
    with PrefectServer(tmp_path, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="30") as server:
        server.run(["work-pool", "create", "keystep-process", "--type", "process"])
        params = {"preset": "configs/micro.yaml", "registry_dir": str(registry),
                  "overrides": {"storage.workspace": str(ws)}}
        server.run(["--no-prompt", "deploy", "--name", "rerun-new-datasets", "--interval", "10",
                    "--params", json.dumps(params)])
        deployment = server.get("deployments/name/rerun-new-datasets/rerun-new-datasets")
        assert deployment["schedules"][0]["schedule"]["interval"] == 10 and deployment["schedules"][0]["active"]

        deadline = time.monotonic() + 90
        while not (scheduled := [r for r in runs_of(server, deployment["id"]) if r["auto_scheduled"]]):
            assert time.monotonic() < deadline, "the scheduler created no run in 90 s:\n" + server.log("server")[-3000:]
            time.sleep(2)
        assert all(r["state_type"] == "SCHEDULED" for r in scheduled)

        server.start("worker", ["worker", "start", "--pool", "keystep-process", "--type", "process"])
        deadline = time.monotonic() + 240
        while True:
            ended = runs_of(server, deployment["id"], ("COMPLETED", "FAILED", "CRASHED"))
            failed = [r["state_name"] for r in ended if r["state_type"] != "COMPLETED"]
            assert not failed, f"{failed}\n{server.log('worker')[-3000:]}"
            if ended:
                break
            assert time.monotonic() < deadline, "no run completed in 240 s:\n" + server.log("worker")[-3000:]
            time.sleep(2)
        runs = runs_of(server, deployment["id"])
        print(f"scheduled runs created by the server: {sum(r['auto_scheduled'] for r in runs)}, "
              f"completed: {sum(r['state_type'] == 'COMPLETED' for r in runs)}")
    assert not server.server_faults(), server.server_faults()
