import pytest

from storage.catalog import SCHEMA_VERSION, Catalog


def test_schema_is_versioned_and_migrations_are_idempotent(tmp_path):
    c = Catalog(tmp_path / "c.duckdb")
    assert c.schema_version() == SCHEMA_VERSION >= 1
    Catalog(tmp_path / "c.duckdb")  # reopening applies nothing twice
    assert c.execute("select count(*) as n from schema_version")[0]["n"] == SCHEMA_VERSION


def test_a_failed_write_leaves_no_half_written_rows(catalog):
    with pytest.raises(RuntimeError):
        with catalog.transaction() as con:
            catalog.insert(con, "bad_rows", [{"dataset_fp": "d", "row_index": i, "reason": "x", "raw": ""} for i in range(10)])
            catalog.record_stage(con, "fp1", stage="ingest", code_version="1", config={}, upstream=[])
            raise RuntimeError("killed mid-write")
    assert catalog.execute("select count(*) as n from bad_rows")[0]["n"] == 0
    assert catalog.stage_output("fp1") is None


def test_killed_process_leaves_no_rows(tmp_path):
    """A process killed inside a transaction: the catalog reopens without its rows."""
    import subprocess
    import sys
    path = tmp_path / "c.duckdb"
    Catalog(path)
    code = f"""
import os
from storage.catalog import Catalog
c = Catalog({str(path)!r})
with c.transaction() as con:
    c.insert(con, "bad_rows", [{{"dataset_fp": "d", "row_index": i, "reason": "x", "raw": ""}} for i in range(1000)])
    os._exit(9)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9
    assert Catalog(path).execute("select count(*) as n from bad_rows")[0]["n"] == 0


def test_stage_output_round_trip(catalog):
    with catalog.transaction() as con:
        catalog.record_stage(con, "fp2", stage="train", code_version="3", config={"a": 1}, upstream=["x"],
                             summary={"loss": 0.5})
    out = catalog.stage_output("fp2")
    assert out["stage"] == "train" and out["summary"] == {"loss": 0.5}
