"""Table `runs` tells the truth: a run whose process is gone is marked killed, never left running; one run at a time
holds a workspace, and a second one waits for it."""
import subprocess
import sys
import time

from storage.runs import HOST, holds_lock, reconcile, run_lock, start_run


def status(catalog):
    return {r["run_id"]: r["status"] for r in catalog.execute("select run_id, status from runs")}


def test_a_run_whose_process_is_gone_is_marked_killed_and_a_live_one_is_not(catalog, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    start_run(catalog, "live", None, "{}").stop()                   # this process: alive
    start_run(catalog, "dead", "flow-1", "{}").stop()
    catalog.execute("update runs set pid = ? where run_id = 'dead'", [gone.pid])
    dead = reconcile(catalog, tmp_path)
    assert [d["run_id"] for d in dead] == ["dead"] and "is gone" in dead[0]["reason"] and dead[0]["flow_run_id"] == "flow-1"
    assert status(catalog) == {"live": "running", "dead": "killed"}
    row = catalog.execute("select finished_at, heartbeat_at from runs where run_id = 'dead'")[0]
    assert row["finished_at"] == row["heartbeat_at"]                # it ended when it last said it was alive


def test_another_hosts_run_is_killed_only_once_it_has_been_silent(catalog, tmp_path):
    start_run(catalog, "far", None, "{}").stop()
    catalog.execute("update runs set host = 'elsewhere', pid = 1 where run_id = 'far'")
    assert reconcile(catalog, tmp_path) == []
    catalog.execute("update runs set heartbeat_at = current_timestamp - interval 1 hour where run_id = 'far'")
    assert [d["run_id"] for d in reconcile(catalog, tmp_path)] == ["far"]


def test_while_the_workspace_lock_is_held_no_other_run_of_this_host_can_be_alive(catalog, tmp_path):
    start_run(catalog, "stale", None, "{}").stop()                   # our own pid: looks alive
    assert reconcile(catalog, tmp_path) == []
    with run_lock(tmp_path):
        assert holds_lock(tmp_path)
        with run_lock(tmp_path):                                     # re-entrant within a process
            assert [d["run_id"] for d in reconcile(catalog, tmp_path, own_run_id="mine")] == ["stale"]
    assert not holds_lock(tmp_path) and HOST


def test_heartbeat_moves_while_the_run_lives(catalog):
    beat = start_run(catalog, "r", None, "{}")
    beat.stop()
    first = catalog.execute("select heartbeat_at from runs")[0]["heartbeat_at"]
    from storage.runs import Heartbeat

    again = Heartbeat(catalog, "r", every_s=0.05).start()
    time.sleep(0.5)
    again.stop()
    assert catalog.execute("select heartbeat_at from runs")[0]["heartbeat_at"] > first


def test_a_second_process_waits_for_the_lock_and_says_for_whom(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from storage.runs import run_lock
with run_lock(__import__('pathlib').Path({str(tmp_path)!r})):
    print('held', flush=True)
    time.sleep(2)
"""], stdout=subprocess.PIPE, text=True, cwd=__import__("tests.conftest", fromlist=["ROOT"]).ROOT)
    assert holder.stdout.readline().strip() == "held"
    said, t0 = [], time.monotonic()
    with run_lock(tmp_path, on_wait=said.append):
        waited = time.monotonic() - t0
    holder.wait()
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "waiting" in said[0]
    assert waited > 0.5                                              # it waited for the holder to let go
