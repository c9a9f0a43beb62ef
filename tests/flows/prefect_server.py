"""A real local Prefect server (and workers) in subprocesses, for the deployment and schedule tests: started on a free
port with its own PREFECT_HOME, each process logging to a file under `logs/`, all stopped on exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.teacher_backends import free_port
from tests.conftest import ROOT


class PrefectServer:
    def __init__(self, tmp_path: Path, **env: str):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": self.api,
                    "KEYSTEP_ROOT": str(ROOT), **env}
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str]) -> None:
        """`prefect ARGS` in the background, logging to logs/NAME.log."""
        out = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=self.env,
                                           stdout=out, stderr=subprocess.STDOUT))

    def run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """`prefect ARGS`, which must succeed."""
        r = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def server_faults(self) -> list[str]:
        """The tracebacks in the server's log other than two transient ones of 2 busy cores: SQLite's `database is
        locked` (a write, a worker's heartbeat, meets another writer; Prefect logs it and the next heartbeat writes
        again), and SQLAlchemy's "Exception during reset" of a pooled connection whose request was cancelled while
        it rolled back (a client that gave up waiting; the pool discards that connection)."""
        chunks = self.log("server").split("Traceback (most recent call last):")[1:]
        return [c[-1500:] for c in chunks if "database is locked" not in c
                and not ("in _finalize_fairy" in c and c.rstrip().endswith("CancelledError"))]

    def get(self, path: str):
        return self._read(urllib.request.Request(f"{self.api}/{path}"))

    def post(self, path: str, body: dict):
        """A POST that reads (e.g. `flow_runs/filter`), so it is safe to send again."""
        return self._read(urllib.request.Request(f"{self.api}/{path}", data=json.dumps(body).encode(),
                                                 headers={"content-type": "application/json"}))

    def _read(self, req: urllib.request.Request, attempts: int = 3):
        # On 2 busy cores the one-process server (API, scheduler and other services sharing one SQLite file) has
        # stalled past 30 s while a worker started a flow run; a read that times out is asked again, and the
        # callers' own deadlines still bound the wait
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return json.loads(resp.read())
            except TimeoutError:
                if attempt == attempts - 1:
                    raise

    def __enter__(self) -> "PrefectServer":
        self.start("server", ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.api}/health", timeout=2)
                return self
            except OSError:
                assert time.monotonic() < deadline, self.log("server")[-3000:]
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
