import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As on a fresh machine: no Prefect database from an earlier run (the CLI's temporary server creates its own, slowly,
# on first start — the failure a new user meets first). Set before anything imports Prefect; subprocesses inherit it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="keystep-test-prefect-home-")
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def catalog(tmp_path):
    from storage.catalog import Catalog
    return Catalog(tmp_path / "catalog.duckdb")


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect server for flow tests."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


def micro_config(workspace, **overrides):
    from keystep.config import load_config
    return load_config(ROOT / "configs" / "micro.yaml", {"storage.workspace": str(workspace), **overrides})


# The longest test files first (seconds on 2 busy cores, from `--durations`): `make test` hands two workers one file
# at a time in collection order (--dist loadfile --no-loadscope-reorder), so a long file started last would leave one
# worker idle at the end; longest first keeps both busy to the end.
LONGEST_FIRST = ["tests/flows/test_deployment.py", "tests/flows/test_distill.py", "tests/test_cli.py",
                 "tests/flows/test_chaos.py", "tests/test_bench_smoke.py", "tests/flows/test_experiment.py",
                 "tests/test_make.py", "tests/test_bad_inputs.py", "tests/flows/test_schedule.py",
                 "tests/flows/test_rerun.py", "tests/tasks/test_teacher_scores.py", "tests/tasks/test_parallel.py"]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable: a file keeps its order
