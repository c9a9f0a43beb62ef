"""`rerun-new-datasets`: scan a registry of datasets and run `distill` for each new or changed one.

The registry is a folder of dataset files (.jsonl/.json/.csv/.parquet) and/or hub ids. Each entry is
identified by its content hash; an entry whose (path, hash) already completed is skipped, so a second
scan with nothing new starts nothing. Every dataset becomes `data.train` of the preset (same field
mapping), in the preset's workspace, so teacher rationales already paid for are reused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.distill import distill
from keystep.config import load_config
from storage.fingerprint import file_hash
from storage.workspace import Workspace

DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def registry_entries(registry_dir: str | None, hub_ids: list[str], log=print) -> list[tuple[str, str, str]]:
    """(entry, source, content hash) for every dataset in the registry. A registry folder that is not there is one
    log line and an empty scan (a scheduled run every hour must not crash for it), a path that is a file an error."""
    entries = []
    if registry_dir:
        folder = Path(registry_dir)
        if not folder.exists():
            log(f"registry folder '{folder.resolve()}' does not exist: nothing to scan; create it and drop dataset "
                "files there (see datasets/README.md), or set registry_dir")
        elif not folder.is_dir():
            raise ValueError(f"registry_dir '{registry_dir}' is a file, not a folder of dataset files")
    if registry_dir and Path(registry_dir).is_dir():
        for p in sorted(Path(registry_dir).iterdir()):
            if p.suffix.lower() in DATA_SUFFIXES and p.is_file():
                entries.append((str(p), "file", file_hash(p)))
    for hub_id in hub_ids:
        content = file_hash(hub_id) if Path(hub_id).exists() else _hub_hash(hub_id)
        entries.append((hub_id, "hub", content))
    return entries


def _hub_hash(hub_id: str) -> str:
    import datasets  # a hub dataset's version: its fingerprint as datasets computes it

    return datasets.load_dataset(hub_id, split="train")._fingerprint


@flow(name="rerun-new-datasets", log_prints=True)
def rerun_new_datasets(preset: str = "configs/demo.yaml", registry_dir: str | None = "datasets",
                       hub_ids: list[str] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    base = load_config(preset, overrides)
    catalog = Workspace(base.storage.workspace).catalog()
    logger = get_run_logger()
    done = {(r["entry"], r["content_hash"]) for r in
            catalog.execute("select entry, content_hash from registry_scans where status = 'completed'")}
    started, skipped, failed = [], [], []
    for entry, source, digest in registry_entries(registry_dir, hub_ids or [], log=logger.warning):
        if (entry, digest) in done:
            skipped.append(entry)
            continue
        template = base.data.train
        spec_source = template.source if template.source in ("file", "gsm8k", "svamp") and source == "file" else source
        spec = template.model_copy(update={"name": Path(entry).stem if source == "file" else entry,
                                           "source": spec_source, "path": entry})
        config = base.model_copy(update={"data": base.data.model_copy(update={"train": spec})})
        logger.info("new dataset %s (%s): running distill", entry, digest)
        try:
            summary = distill(config=config)
            catalog.execute("insert into registry_scans (entry, content_hash, status, distill_run_id) values (?, ?, 'completed', ?)",
                            [entry, digest, summary.run_id])
            started.append(entry)
        except Exception as err:  # noqa: BLE001 - one bad dataset must not stop the others
            catalog.execute("insert into registry_scans (entry, content_hash, status, error) values (?, ?, 'failed', ?)",
                            [entry, digest, f"{type(err).__name__}: {err}"[:2000]])
            failed.append(entry)
            logger.error("dataset %s failed: %s", entry, err)
    if failed:
        raise RuntimeError(f"distill failed for {len(failed)} new dataset(s): {failed}; see table registry_scans")
    return {"started": started, "skipped": skipped}
