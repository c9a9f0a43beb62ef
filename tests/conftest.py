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
