"""The DuckDB catalog: the one place that opens the database file.

Inputs: a workspace's catalog path. Outputs: versioned schema (storage/sql/NNN_*.sql migrations), stage
fingerprint records, bulk row writes inside transactions, and named queries (storage/sql/<name>.sql).

DuckDB allows one writing process; connections are opened per operation and closed right after, so another
process (`keystep results`, a second run) waits briefly for the file lock instead of failing.
"""
from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from storage.fingerprint import Lineage, canonical

SQL_DIR = Path(__file__).parent / "sql"
_MIGRATION = re.compile(r"^(\d{3})_.*\.sql$")
# One process-wide lock per catalog file: tasks run in threads of the flow process and DuckDB's optimistic
# concurrency would make two writers of the same table conflict.
_LOCKS: dict[str, threading.RLock] = {}


def sql(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text()


def migrations() -> list[tuple[int, Path]]:
    found = []
    for p in sorted(SQL_DIR.glob("*.sql")):
        m = _MIGRATION.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return found


SCHEMA_VERSION = max(v for v, _ in migrations())


class CatalogLocked(RuntimeError):
    pass


class Catalog:
    def __init__(self, path: str | Path, lock_timeout_s: float = 60.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._lock = _LOCKS.setdefault(str(self.path.resolve()), threading.RLock())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.migrate()

    # -- connections -------------------------------------------------------------------------------
    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as err:  # another process holds the write lock
                if "lock" not in str(err).lower() or time.monotonic() > deadline:
                    raise CatalogLocked(
                        f"catalog '{self.path}' is locked by another process for over {self.lock_timeout_s:.0f}s; "
                        "wait for the running flow to finish or use another --workspace") from err
                time.sleep(0.2)

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            con = self._open(read_only)
            try:
                yield con
            finally:
                con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All writes inside commit together or not at all (a crash rolls back via DuckDB's WAL)."""
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    # -- schema ------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self.connect() as con:
            return self._version(con)

    @staticmethod
    def _version(con) -> int:
        con.execute("create table if not exists schema_version (version integer, applied_at timestamp default current_timestamp)")
        row = con.execute("select max(version) from schema_version").fetchone()
        return row[0] or 0

    def migrate(self) -> None:
        with self.connect() as con:
            current = self._version(con)
            for version, path in migrations():
                if version <= current:
                    continue
                con.begin()
                try:
                    con.execute(path.read_text())
                    con.execute("insert into schema_version (version) values (?)", [version])
                except BaseException:
                    con.rollback()
                    raise
                con.commit()

    # -- rows --------------------------------------------------------------------------------------
    @staticmethod
    def insert(con, table: str, rows: list[dict[str, Any]] | dict[str, list]) -> int:
        """Bulk insert by column name through Arrow: a list of row dicts, or a dict of columns (for big tables)."""
        tbl = pa.table(rows) if isinstance(rows, dict) else pa.Table.from_pylist(rows)
        if not tbl.num_rows:
            return 0
        con.register("_keystep_rows", tbl)
        try:
            con.execute(f"insert into {table} by name select * from _keystep_rows")
        finally:
            con.unregister("_keystep_rows")
        return tbl.num_rows

    @staticmethod
    def copy_to(con, name: str, target: Path, **params: Any) -> None:
        """Run a `copy (...) to '{target}'` query file: DuckDB writes the Parquet files itself."""
        con.execute(sql(name).replace("{target}", str(target).replace("'", "''")), params)

    # the column that names the stage output a row belongs to, per table a stage writes
    FP_COLUMNS = {"datasets": "dataset_fp", "examples": "dataset_fp", "bad_rows": "dataset_fp", "steps": "steps_fp",
                  "token_weights": "token_weights_fp", "step_difficulty": "difficulty_fp", "curriculum": "fp",
                  "eval_results": "eval_fp", "predictions": "eval_fp",
                  "checkpoints": "train_fp"}

    def replace_rows(self, con, table: str, fp: str, rows: list[dict[str, Any]] | dict[str, list]) -> int:
        """Inside a transaction: the rows of stage output `fp` in `table` become `rows` (a rerun after a kill that
        left none, or a recount, never doubles them)."""
        con.execute(f"delete from {table} where {self.FP_COLUMNS[table]} = ?", [fp])
        return self.insert(con, table, rows)

    def query(self, name: str, **params: Any) -> list[dict[str, Any]]:
        with self.connect() as con:
            return self._fetch(con, sql(name), params)

    def execute(self, statement: str, params: list | dict | None = None) -> list[dict[str, Any]]:
        with self.connect() as con:
            return self._fetch(con, statement, params)

    @staticmethod
    def _fetch(con, statement: str, params) -> list[dict[str, Any]]:
        cur = con.execute(statement, params) if params else con.execute(statement)
        if cur.description is None:
            return []
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    # -- stage outputs -----------------------------------------------------------------------------
    def stage_output(self, fingerprint: str) -> dict[str, Any] | None:
        rows = self.execute("select * from stage_outputs where fingerprint = ?", [fingerprint])
        if not rows:
            return None
        row = rows[0]
        row["summary"] = json.loads(row["summary_json"]) if row["summary_json"] else {}
        return row

    @staticmethod
    def record_stage(con, lineage: Lineage, summary: dict | None = None) -> None:
        """The stage output `lineage.fp`: what it was made from (exactly what its fingerprint hashes) and its summary."""
        con.execute("delete from stage_outputs where fingerprint = ?", [lineage.fp])
        con.execute(
            "insert into stage_outputs (fingerprint, stage, code_version, config_json, upstream_json, extra_json, summary_json)"
            " values (?, ?, ?, ?, ?, ?, ?)",
            [lineage.fp, lineage.stage, lineage.code_version, json.dumps(canonical(lineage.config), sort_keys=True),
             json.dumps(list(lineage.upstream)), json.dumps(canonical(lineage.extra), sort_keys=True),
             json.dumps(summary or {}, default=str)],
        )
