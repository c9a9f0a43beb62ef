"""What every stage shares: its declaration, its typed inputs and output, its one cache, and its Prefect task.

* `Stage(name, Inputs, Output, lineage, body, still_valid=None, **task_options)` — a stage, declared once at the end
  of its module. `lineage(config, inputs)` is what its output is made of (storage/fingerprint.py);
  `body(ws, config, inputs, lineage, **hooks)` does the work and returns the output (or `Made`: output, rows,
  files); `still_valid(config, output)` is an extra rule for a cached output (its folder still exists).
  - `STAGE.run(ws, config, inputs)` — the one place a cache is read: the catalog's output when present and still
    valid, else the body runs and the output is published (`publish_stage`), all or nothing.
  - `STAGE.from_catalog(config, inputs)` — the same with running switched off (`NotCached` when it has not run):
    a cached rerun answered without Prefect.
  - `STAGE(config, inputs)` — in a flow: the stage as its Prefect task, cached by Prefect under the same lineage
    fingerprint (`lineage_key`), its result stored under the workspace (`<workspace>/prefect-results`), so a
    rerun shows the task as Cached in the UI and deleting the workspace forgets both caches.
    `@STAGE.in_prefect` adds what the task does around the run (logs, artifacts, progress).
* `StageInputs` — base of each stage's inputs model (one object per stage); `StageOutput` — base of each output: a
  small pydantic model (fingerprint, paths, counts), never data frames, tensors or models.
* `kept_rationales` — the rationales the student trains on, for every stage that reads them.
"""
from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from keystep.config import DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace


class StageOutput(BaseModel):
    """Base of every stage output. `fp` is the stage's fingerprint."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    fp: str


Output = TypeVar("Output", bound=StageOutput)


def cached_output(catalog, lineage: Lineage, kind: type[Output]) -> Output | None:
    done = catalog.stage_output(lineage.fp)
    return kind.model_validate(done["summary"]) if done else None


def publish_stage(catalog, lineage: Lineage, out: Output, rows: dict[str, list | dict] | None = None,
                  within: Callable[[object], None] | None = None) -> Output:
    """How every stage ends: in one transaction, its rows (table -> rows, replacing any under its fingerprint), then
    `within(con)` (e.g. publishing its files), then its lineage and output in `stage_outputs` — all or nothing, so
    a killed run leaves no half-written stage. The start is `cached_output(catalog, lineage, Kind)`."""
    with catalog.transaction() as con:
        for table, table_rows in (rows or {}).items():
            catalog.replace_rows(con, table, lineage.fp, table_rows)
        if within:
            within(con)
        catalog.record_stage(con, lineage, out.model_dump())
    return out


def kept_rationales(catalog, config: DistillConfig, generation) -> list[dict]:
    """The rationales the student trains on — generated without failure and, unless teacher.keep_only_correct is
    off, with the gold answer — with their question and answer, in dataset order (`generation`: a `Generation`)."""
    return catalog.query("kept_rationales", dataset_fp=generation.dataset_fp, teacher_fp=generation.teacher_fp,
                         only_correct=config.teacher.keep_only_correct)


def workspace_of(config: DistillConfig) -> Workspace:
    return Workspace(config.storage.workspace)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display here, nor on a worker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    """Lay out, write the PNG (dpi 110: readable, still small enough to embed in an artifact), close; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def artifact_markdown(markdown: str, base_dir: Path) -> str:
    """A report's markdown for a Prefect artifact: every PNG it links (relative to `base_dir`) embedded as a data
    URI, since the UI cannot reach the workspace's files."""
    def embed(m: re.Match) -> str:
        path = Path(m.group(2)) if Path(m.group(2)).is_absolute() else base_dir / m.group(2)
        if not path.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _IMAGE.sub(embed, markdown)


# ---- one stage, declared once ---------------------------------------------------------------------------------
class StageInputs(BaseModel):
    """Base of every stage's inputs model: what one run of the stage reads — upstream outputs, and plain values
    such as a dataset spec. A flow passes one such object per stage; the stage's lineage hashes it."""
    model_config = ConfigDict(extra="forbid", frozen=True)


Inputs = TypeVar("Inputs", bound=StageInputs)


@dataclass
class Made:
    """What a stage body returns when it has more to publish than its output: its rows (table -> rows) and
    `within(con)` (moving its files into place), all in the one publishing transaction."""
    output: StageOutput
    rows: dict[str, list | dict] | None = None
    within: Callable[[object], None] | None = None


class NotCached(LookupError):
    """A stage output that is not in the catalog yet: the stage must run."""


class Stage(Generic[Inputs, Output]):
    """A stage, declared once: `Stage(name, Inputs, Output, lineage, body, still_valid=None, **task_options)` (the
    module docstring: what each part is, and `run`, `from_catalog`, calling it and `in_prefect`)."""

    def __init__(self, name: str, inputs: type[Inputs], output: type[Output],
                 lineage: Callable[[DistillConfig, Inputs], Lineage], body: Callable[..., Output | Made],
                 still_valid: Callable[[DistillConfig, Output], bool] | None = None, **task_options):
        self.name, self.inputs, self.output, self.lineage, self.body = name, inputs, output, lineage, body
        self.still_valid, self.task_options = still_valid, task_options
        self.around: Callable[..., Output] | None = None

    def cached(self, ws: Workspace, config: DistillConfig, lineage: Lineage) -> Output | None:
        done = cached_output(ws.catalog(), lineage, self.output)
        return done if done is not None and (self.still_valid is None or self.still_valid(config, done)) else None

    def run(self, ws: Workspace, config: DistillConfig, inputs: Inputs, lineage: Lineage | None = None,
            **hooks) -> Output:
        """The stage's output: from the catalog, or made now and published (`hooks` go to the body: progress
        callbacks and the like, never inputs — they are not in the lineage)."""
        lineage = lineage or self.lineage(config, inputs)
        if (done := self.cached(ws, config, lineage)) is not None:
            return done
        made = self.body(ws, config, inputs, lineage, **hooks)
        made = made if isinstance(made, Made) else Made(made)
        return publish_stage(ws.catalog(), lineage, made.output, made.rows, made.within)

    def from_catalog(self, config: DistillConfig, inputs: Inputs) -> Output:
        """What running the stage would return, read from the catalog without running anything (no Prefect server
        either); `NotCached` when the stage has not run with these inputs."""
        done = self.cached(workspace_of(config), config, self.lineage(config, inputs))
        if done is None:
            raise NotCached(self.name)
        return done

    def in_prefect(self, around: Callable[..., Output]) -> Callable[..., Output]:
        """Decorator: `around(run, config, inputs, lineage)` is the stage's Prefect task; it calls `run(**hooks)`
        once and adds logs and artifacts."""
        self.around = around
        return around

    @functools.cached_property
    def task(self):
        """The Prefect task (built on first use: importing a stage never imports Prefect)."""
        from prefect import task

        def run_stage(config: DistillConfig, inputs: StageInputs, lineage: Lineage, hooks: dict | None = None):
            def run(**more):
                return self.run(workspace_of(config), config, inputs, lineage, **(hooks or {}), **more)
            return self.around(run, config, inputs, lineage) if self.around else run()

        run_stage.__name__ = run_stage.__qualname__ = self.name.replace("-", "_")
        return task(name=self.name, cache_policy=lineage_key(self.output), persist_result=True,
                    **self.task_options)(run_stage)

    def __call__(self, config: DistillConfig, inputs: Inputs, **hooks) -> Output:
        """The stage as its Prefect task: the lineage computed once, here; the task cached by its fingerprint, its
        result stored under the workspace (deleting the workspace forgets it). A catalog output that is no longer
        valid makes the task run afresh rather than return Prefect's copy."""
        ws, lineage = workspace_of(config), self.lineage(config, inputs)
        done = cached_output(ws.catalog(), lineage, self.output) if self.still_valid else None
        stale = done is not None and not self.still_valid(config, done)
        task = self.task.with_options(result_storage=results_block(ws), refresh_cache=True if stale else None)
        return task(config, inputs, lineage, hooks or None)


_SAVED: set[tuple[str, str]] = set()


def results_block(ws: Workspace) -> str:
    """The slug of the LocalFileSystem block holding the workspace's stage task results (`<workspace>/prefect-
    results`): Prefect requires a saved block, so it is saved once per server and process."""
    from prefect.filesystems import LocalFileSystem
    from prefect.settings import PREFECT_API_URL

    key = (str(PREFECT_API_URL.value()), ws.block_name)
    if key not in _SAVED:
        LocalFileSystem(basepath=str(ws.results_dir)).save(ws.block_name, overwrite=True)
        _SAVED.add(key)
    return f"local-file-system/{ws.block_name}"


def lineage_key(output: type[StageOutput]):
    """Prefect's cache policy for a stage task: the key is the lineage fingerprint the task is given — the same
    object the catalog records, so Prefect's cache and the catalog cannot disagree — and the output model's schema:
    Prefect keeps a pickle, so an output that has since gained a field (given a default in the catalog's JSON copy)
    must not come back from an older run without it."""
    import json

    from prefect.cache_policies import CachePolicy

    from storage.fingerprint import content_hash

    schema = content_hash(json.dumps(output.model_json_schema(), sort_keys=True))

    class LineageKey(CachePolicy):
        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
            return f"{inputs['lineage'].fp}-{schema}"

    return LineageKey()


# ---- plain Prefect tasks (no stage of their own) --------------------------------------------------------------
class PrefectTask:
    """`prefect.task(**options)(fn)`, built the first time it is called, mapped, submitted or given options — so
    importing a stage module never imports Prefect (a torchrun rank, a bench script and a test run the plain
    functions). `fn` and `name` are there without building it."""

    def __init__(self, fn, **options):
        functools.update_wrapper(self, fn)
        self.fn, self.options, self.name = fn, options, options.get("name", fn.__name__)

    @functools.cached_property
    def task(self):
        from prefect import task

        return task(**self.options)(self.fn)

    def __call__(self, *args, **kwargs):
        return self.task(*args, **kwargs)

    def __getattr__(self, attr):   # map, submit, with_options, ...: the Prefect task's
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.task, attr)


def prefect_task(**options):
    """`@prefect.task(**options)`, built on first use (see `PrefectTask`)."""
    return lambda fn: PrefectTask(fn, **options)
