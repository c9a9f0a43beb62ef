"""`make serve` and `make deploy` fail fast, with one line naming the fix: a port already taken (a second `make serve`
must not print the first server's UI address nor start a second worker), no server to deploy to."""
import re
import socket
import subprocess

from tasks.teacher_backends import free_port
from tests.conftest import ROOT


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def own_lines(r: subprocess.CompletedProcess) -> list[str]:
    """What the recipe printed, less make's own 'make: *** ... Error 1' trailer ('make[1]: ***' under `make test`)."""
    return [x for x in (r.stdout + r.stderr).splitlines() if x.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", x)]


def test_make_serve_on_a_port_in_use_is_one_line_and_starts_nothing():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = make("serve", f"PORT={port}")
    assert r.returncode != 0
    assert len(own_lines(r)) == 1 and "already in use" in own_lines(r)[0] and "PORT=" in own_lines(r)[0], own_lines(r)
    assert "Prefect UI" not in r.stdout and "worker" not in r.stdout.lower()


def test_make_deploy_with_no_server_is_one_line():
    r = make("deploy", f"PORT={free_port()}")
    assert r.returncode != 0
    assert len(own_lines(r)) == 1 and "no Prefect server" in own_lines(r)[0] and "make serve" in own_lines(r)[0]
    assert "Traceback" not in r.stderr and "ConnectError" not in r.stderr
