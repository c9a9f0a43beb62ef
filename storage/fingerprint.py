"""Stage fingerprints and lineage: hash of (stage name, its config, upstream fingerprints, stage code version).

A fingerprint names a stage output everywhere: the catalog rows, the folders under the workspace and the
Prefect cache key. Same inputs, same fingerprint; change one section and only that stage and what is
downstream of it get new fingerprints.

A stage builds one `Lineage` from its config section and its upstream outputs; its `fp` is the Prefect cache
key and the catalog records the same object (`Catalog.record_stage`), so what the catalog says a stage was made
from is exactly what was hashed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def canonical(obj: Any) -> Any:
    """A JSON-ready, order-independent form of a config: pydantic models (at any depth) become their JSON dump,
    tuples become lists, paths strings. Anything else is an error, so no value is ever hashed through `str()`
    (whose form can change with a library upgrade and silently invalidate every cache)."""
    if isinstance(obj, BaseModel):   # a config section says what of it a fingerprint sees (keystep/config.py)
        form = getattr(obj, "fingerprint_form", None)
        return canonical(form() if form else obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: pass config values, fingerprints or paths")


def fingerprint(stage: str, config: Any, upstream: list[str] | tuple[str, ...] = (), code_version: str = "1",
                extra: dict[str, Any] | None = None) -> str:
    payload = json.dumps({"stage": stage, "config": canonical(config), "upstream": list(upstream),
                          "code": code_version, "extra": canonical(extra or {})}, sort_keys=True)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Lineage:
    """What a stage output is made of. `fp` hashes all of it; the catalog stores all of it."""
    stage: str
    config: Any
    upstream: tuple[str, ...] = ()        # fingerprints of the stage outputs it reads
    code_version: str = "1"
    extra: dict[str, Any] = field(default_factory=dict)   # inputs that are no stage output (a file's content hash)

    @property
    def fp(self) -> str:
        return fingerprint(self.stage, self.config, self.upstream, self.code_version, self.extra)


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
