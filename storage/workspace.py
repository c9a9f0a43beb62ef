"""Workspace layout: every path a stage writes, derived from the workspace root and a fingerprint.

    <workspace>/catalog.duckdb          the catalog
    <workspace>/models/<fp>/            student init (HF model dir + tokenizer)
    <workspace>/checkpoints/<fp>/epoch-N/  per-epoch training checkpoints (HF dir + optimizer state)
    <workspace>/curricula/<fp>/stage=N/  curriculum Parquet shards (KPOD §4.3)
    <workspace>/reports/<fp>.md         markdown reports
    <workspace>/prefect-results/        Prefect's persisted stage task results (tasks/stage.py)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path

from storage.catalog import Catalog

# one Catalog per catalog file per process, so the migration check runs once (Catalog opens a connection per use and
# serialises them itself; other processes have their own, and DuckDB's file lock keeps one writer at a time)
_CATALOGS: dict[str, Catalog] = {}
_CATALOGS_LOCK = threading.Lock()


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def catalog(self) -> Catalog:
        """The workspace's catalog, migrated once per process (made anew when its file was removed meanwhile)."""
        with _CATALOGS_LOCK:
            cat = _CATALOGS.get(str(self.catalog_path))
            if cat is None or not self.catalog_path.exists():
                cat = _CATALOGS[str(self.catalog_path)] = Catalog(self.catalog_path)
            return cat

    def model_dir(self, fp: str) -> Path:
        return self.root / "models" / fp

    def checkpoint_dir(self, fp: str, epoch: int) -> Path:
        return self.root / "checkpoints" / fp / f"epoch-{epoch}"

    def checkpoints_root(self, fp: str) -> Path:
        return self.root / "checkpoints" / fp

    def curriculum_dir(self, fp: str) -> Path:
        """Parquet shards of a curriculum, one `stage=N/` folder per stage."""
        return self.root / "curricula" / fp

    def report_path(self, fp: str) -> Path:
        return self.root / "reports" / f"{fp}.md"

    @property
    def results_dir(self) -> Path:
        return self.root / "prefect-results"

    @property
    def block_name(self) -> str:
        """Name of the Prefect LocalFileSystem block that stores this workspace's task results."""
        return "keystep-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:12]


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp folder into place (a killed run leaves no half-written dir)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_atomic(path: Path, content) -> Path:
    """Write one file whole or not at all (a temp name beside it, then a rename): `content` is text, or a pyarrow
    table written as Parquet (zstd). The temp name ends in neither the file's suffix nor a glob's pattern."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        import pyarrow.parquet as pq

        pq.write_table(content, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def temp_dir_for(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
