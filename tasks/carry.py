"""Carry a trained student to another machine (`keystep pack` / `keystep unpack`).

A finished train stage is a model folder and one catalog row (its lineage and output). `pack_trained` copies the
last epoch's folder — less its optimizer state, which only the resume of an unfinished run reads — beside a manifest:
the stage's lineage as the catalog records it, its output, and a hash of every file. `unpack_trained` checks that the
config makes the same train fingerprint here (same train settings, same upstream fingerprints, same code version:
a difference is named key by key) and that every file arrived whole, then puts the folder where training would have
written it and records the output under that fingerprint in one transaction. The config's run then trains nothing:
its train stage is a cache hit. Not carried: the other epochs and any upstream stage's output (a reference teacher's
generation, a scratch student's tokenizer: cheap, and made again by the run).

Input: the train stage's lineage, computed from the config without running anything (flows/phases.py
`planned_run`), and a workspace whose catalog holds its output (pack) or a pack folder (unpack).
Output: the pack folder (`keystep-pack.json` + `model/`), or the `Trained` output recorded in the workspace.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from keystep.config import ConfigError, DistillConfig
from storage.fingerprint import Lineage, canonical, file_hash
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.stage import publish_stage
from tasks.train import TRAIN
from tasks.training import Trained

MANIFEST = "keystep-pack.json"
FORMAT = 1
LEFT_OUT = {"trainer_state.pt"}   # optimizer and scheduler state: only resuming an unfinished run reads it


def lineage_form(lineage: Lineage) -> dict:
    """A lineage as JSON, exactly as its fingerprint hashes it."""
    return {"stage": lineage.stage, "config": canonical(lineage.config), "upstream": list(lineage.upstream),
            "code_version": lineage.code_version, "extra": canonical(lineage.extra)}


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def lineage_difference(packed: dict, here: dict) -> str:
    """What differs between two train lineages, key by key (config keys with both values, upstream fingerprints,
    the stage's code version)."""
    parts = []
    if packed["code_version"] != here["code_version"]:
        parts.append(f"the train stage's code version (packed {packed['code_version']}, here {here['code_version']}: "
                     "another keystep version)")
    section = "" if "train" in here["config"] else "train."   # with LoRA the config is {train: ..., lora: ...}
    a, b = _flat(packed["config"], section), _flat(here["config"], section)
    parts += [f"{key}: packed {a.get(key)!r}, here {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
              if a.get(key) != b.get(key)]
    if packed["upstream"] != here["upstream"]:
        parts.append(f"upstream outputs (packed {', '.join(packed['upstream'])}; here {', '.join(here['upstream'])}: "
                     "the data, the teacher or the student before training differ)")
    a, b = _flat(packed["extra"]), _flat(here["extra"])
    parts += [f"{key}: packed {a.get(key)!r}, here {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
              if a.get(key) != b.get(key)]
    return "; ".join(parts) or "nothing in the lineage (a pack made by hand?)"


def epoch_folder(final_dir: str) -> Path:
    """The epoch folder holding the trained student (LoRA with merge: `final_dir` is its `merged/` subfolder)."""
    path = Path(final_dir)
    return path.parent if path.name == "merged" else path


def pack_trained(ws: Workspace, lineage: Lineage, dest: Path, name: str) -> dict:
    """Write the train output `lineage.fp` of `ws` as a pack folder at `dest` (replacing a pack there); returns the
    manifest. `name` (the preset) labels the errors and the manifest."""
    done = ws.catalog().stage_output(lineage.fp) if ws.catalog_path.exists() else None
    if done is None:
        raise ConfigError(f"{name}: no trained student in workspace '{ws.root}' (train stage {lineage.fp}); run "
                          f"`keystep run {name}` first, or pass --workspace")
    trained = Trained.model_validate(done["summary"])
    src = epoch_folder(trained.final_dir)
    if not Path(trained.final_dir).is_dir():
        raise ConfigError(f"{name}: the trained student's folder '{trained.final_dir}' was removed; run "
                          f"`keystep run {name}` again to make it")
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise ConfigError(f"'{dest}' is a folder with other files in it; give a new or empty folder (or an "
                          "earlier pack, which is replaced)")
    tmp = temp_dir_for(dest)
    files = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name not in LEFT_OUT):
        rel = path.relative_to(src)
        (tmp / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tmp / "model" / rel)
        files[str(rel)] = file_hash(path)
    manifest = {"format": FORMAT, "preset": name, "fingerprint": lineage.fp, "lineage": lineage_form(lineage),
                "epoch_folder": src.name, "final": str(Path(trained.final_dir).relative_to(src)),
                "trained": trained.model_dump(exclude={"final_dir", "init_dir"}), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    publish_dir(tmp, dest)
    return manifest


def read_manifest(src: Path) -> dict:
    path = Path(src).expanduser() / MANIFEST
    if not path.is_file():
        raise ConfigError(f"'{src}' is not a keystep pack: no {MANIFEST} in it (`keystep pack CONFIG DEST` makes one)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"'{path}': pack format {manifest.get('format')!r}, this keystep reads format {FORMAT}")
    return manifest


def unpack_trained(ws: Workspace, config: DistillConfig, lineage: Lineage, init_dir: str, src: Path,
                   name: str) -> tuple[Trained, bool]:
    """Record the pack at `src` as the train output `lineage.fp` of `ws` (its student before training: `init_dir`);
    returns the output and whether it was recorded now (False: the workspace already had it, still valid)."""
    src = Path(src).expanduser().resolve()
    manifest = read_manifest(src)
    if manifest["fingerprint"] != lineage.fp:
        raise ConfigError(f"'{src}' holds train stage {manifest['fingerprint']} (packed from "
                          f"{manifest.get('preset')}), but {name} makes {lineage.fp} here: "
                          + lineage_difference(manifest["lineage"], lineage_form(lineage)))
    if (done := TRAIN.cached(ws, config, lineage)) is not None:   # the stage's own cache rule
        return done, False
    for rel, digest in manifest["files"].items():
        path = src / "model" / rel
        if not path.is_file() or file_hash(path) != digest:
            raise ConfigError(f"'{path}': {'missing' if not path.is_file() else 'not the file that was packed'} "
                              "(a copy cut short or changed?); copy the pack again")
    folder = ws.checkpoints_root(lineage.fp) / manifest["epoch_folder"]
    tmp = temp_dir_for(folder)
    shutil.copytree(src / "model", tmp, dirs_exist_ok=True)
    publish_dir(tmp, folder)
    trained = Trained.model_validate({**manifest["trained"], "final_dir": str(folder / manifest["final"]),
                                      "init_dir": init_dir})
    config_file = folder / "keystep_config.json"
    row = {"train_fp": lineage.fp, "epoch": trained.epochs, "path": str(folder),
           "config_json": config_file.read_text() if config_file.is_file() else None,
           "metrics_json": json.dumps(trained.history[-1] if trained.history else {})}
    return publish_stage(ws.catalog(), lineage, trained, rows={"checkpoints": [row]}), True
