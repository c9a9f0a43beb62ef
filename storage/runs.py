"""Table `runs`: what each distill run on a workspace was and how it ended — and who may run there now.

A run row is written when a run starts ('running', with its pid, host and a heartbeat), beats every
`HEARTBEAT_S` while it lives, and ends 'completed' or 'failed'. A run killed without warning (SIGKILL, a lost
machine) cannot end its row, so `reconcile` — called by the next run on the workspace and by `keystep results` —
marks 'killed' every running row whose process is gone: on this host, a pid that no longer runs (or, while the
caller holds the workspace's run lock, any other row of this host: none can be alive); on another host, a heartbeat
older than `STALE_S`.

`run_lock` serialises runs on one workspace: a second run waits (saying once for whom) until the first ends, then
finds its stages cached. It is an flock on `<workspace>/run.lock`, so the kernel drops it when a process dies, and
it is re-entrant within a process (an experiment's arms are subflows of one process).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

HEARTBEAT_S = 30.0
STALE_S = 600.0
HOST = socket.gethostname()

_held: dict[str, int] = {}          # lock path -> depth, for this process
_held_guard = threading.Lock()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process: it exists
        return True
    return True


def holds_lock(root: Path) -> bool:
    return _held.get(str(Path(root) / "run.lock"), 0) > 0


@contextmanager
def run_lock(root: Path, on_wait: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the workspace's run lock; when another process holds it, say so once and wait."""
    path = Path(root) / "run.lock"
    key = str(path)
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another run"
            on_wait(f"workspace {root} is in use by {holder}; waiting for it to finish (its stages are then reused)")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {HOST}\n")
        fh.flush()
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held[key] = 0
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def reconcile(catalog, root: Path, own_run_id: str | None = None) -> list[dict]:
    """Mark 'killed' the running rows whose process is gone (see the module docstring); returns them."""
    locked = holds_lock(root)
    dead = []
    for row in catalog.query("runs_open"):
        if row["run_id"] == own_run_id:
            continue
        if row["host"] == HOST:
            gone = locked or not _alive(row["pid"])
        else:   # another machine (a shared workspace): only its silence tells
            gone = row["silent_s"] is not None and row["silent_s"] > STALE_S
        if gone:
            reason = (f"process {row['pid']} on {row['host']} is gone; last heartbeat {row['heartbeat_at']}"
                      if row["host"] else "no process recorded (written before runs had heartbeats)")
            catalog.query("run_killed", run_id=row["run_id"], reason=json.dumps({"killed": reason}))
            dead.append({**row, "reason": reason})
    return dead


class Heartbeat:
    """Beats a running row every `HEARTBEAT_S` from a daemon thread until `stop`."""

    def __init__(self, catalog, run_id: str, every_s: float = HEARTBEAT_S):
        self.catalog, self.run_id, self.every_s = catalog, run_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"keystep-heartbeat-{run_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.catalog.query("run_heartbeat", run_id=self.run_id)
            except Exception:  # noqa: BLE001 - a missed beat is only a later reconcile's business
                pass

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_run(catalog, run_id: str, flow_run_id: str | None, config_json: str) -> Heartbeat:
    catalog.query("run_started", run_id=run_id, flow_run_id=flow_run_id, config_json=config_json, pid=os.getpid(),
                  host=HOST)
    return Heartbeat(catalog, run_id).start()
