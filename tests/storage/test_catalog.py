import pytest

import json

from storage.catalog import SCHEMA_VERSION, Catalog
from storage.fingerprint import Lineage, canonical


def test_schema_is_versioned_and_migrations_are_idempotent(tmp_path):
    c = Catalog(tmp_path / "c.duckdb")
    assert c.schema_version() == SCHEMA_VERSION >= 1
    Catalog(tmp_path / "c.duckdb")  # reopening applies nothing twice
    assert c.execute("select count(*) as n from schema_version")[0]["n"] == SCHEMA_VERSION


def test_a_failed_write_leaves_no_half_written_rows(catalog):
    with pytest.raises(RuntimeError):
        with catalog.transaction() as con:
            catalog.insert(con, "bad_rows", [{"dataset_fp": "d", "row_index": i, "reason": "x", "raw": ""} for i in range(10)])
            catalog.record_stage(con, Lineage("ingest", {}))
            raise RuntimeError("killed mid-write")
    assert catalog.execute("select count(*) as n from bad_rows")[0]["n"] == 0
    assert catalog.stage_output(Lineage("ingest", {}).fp) is None


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
    lineage = Lineage("train", {"a": 1}, ("x",), "3", {"content": "abc"})
    with catalog.transaction() as con:
        catalog.record_stage(con, lineage, summary={"loss": 0.5})
    out = catalog.stage_output(lineage.fp)
    assert out["stage"] == "train" and out["summary"] == {"loss": 0.5}
    # what is recorded is exactly what the fingerprint hashes
    recorded = Lineage(out["stage"], json.loads(out["config_json"]), tuple(json.loads(out["upstream_json"])),
                       out["code_version"], json.loads(out["extra_json"]))
    assert recorded.fp == lineage.fp == out["fingerprint"]


def test_canonical_is_recursive_and_refuses_what_it_cannot_hash():
    from keystep.config import DistillConfig

    config = DistillConfig()
    nested = {"outer": [config.train, (config.eval, {"deep": config.steps})]}
    train = {k: v for k, v in config.train.model_dump(mode="json").items()
             if k not in ("token_weight_floor", "kd", "on_policy")}   # `added_later` fields at their default: not hashed
    evaluation = {k: v for k, v in config.eval.model_dump(mode="json").items() if k != "curve_questions"}   # idem
    assert canonical(nested) == {"outer": [train, [evaluation, {"deep": config.steps.model_dump(mode="json")}]]}
    assert json.dumps(canonical(nested))   # JSON all the way down: nothing is hashed through str()
    with pytest.raises(TypeError, match="cannot fingerprint"):
        canonical({"x": object()})


def test_one_catalog_per_workspace_per_process_migrated_once(tmp_path, monkeypatch):
    from storage.catalog import Catalog
    from storage.workspace import Workspace

    migrations = []
    real = Catalog.migrate
    monkeypatch.setattr(Catalog, "migrate", lambda self: migrations.append(self.path) or real(self))
    first = Workspace(tmp_path / "ws").catalog()
    assert Workspace(tmp_path / "ws").catalog() is first and Workspace(str(tmp_path / "ws") + "/").catalog() is first
    assert len(migrations) == 1 and Workspace(tmp_path / "other").catalog() is not first
    first.execute("create table marker (x integer)")
    (tmp_path / "ws" / "catalog.duckdb").unlink()           # removed under a long-lived process: made and migrated anew
    again = Workspace(tmp_path / "ws").catalog()
    assert again is not first and again.stage_output("none") is None and len(migrations) == 3
