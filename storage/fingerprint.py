"""Stage fingerprints: hash of (stage name, its config section, upstream fingerprints, stage code version).

A fingerprint names a stage output everywhere: the catalog rows, the folders under the workspace and the
Prefect cache key. Same inputs, same fingerprint; change one section and only that stage and what is
downstream of it get new fingerprints.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return obj


def fingerprint(stage: str, config: Any, upstream: list[str] | tuple[str, ...] = (), code_version: str = "1",
                extra: dict[str, Any] | None = None) -> str:
    payload = json.dumps(
        {"stage": stage, "config": canonical(config), "upstream": list(upstream), "code": code_version,
         "extra": extra or {}},
        sort_keys=True, default=str,
    )
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
