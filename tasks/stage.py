"""What every stage shares: its typed output, its cached result, and how it becomes a Prefect task.

* `StageOutput` — what a stage hands downstream: a small pydantic model (fingerprint, paths, counts), never data
  frames, tensors or models. Prefect persists it; flows and later stages read attributes.
* `cached_output` — a stage's output already in the catalog (a rerun, or a second arm of an experiment): how every
  stage starts; `publish_stage` — its rows, lineage and output in one transaction: how every stage ends.
* `kept_rationales` — the rationales the student trains on, for every stage that reads them.
* `stage_task(name, lineage)` — the Prefect task of a stage. Its cache key is `lineage(*the task's arguments).fp`:
  the same function the stage calls to record its lineage in the catalog, so the cache key and the recorded
  lineage cannot disagree.
* `use_workspace(config)` — called once at the top of each flow: this flow run's task results (the cache) are
  stored under the workspace (`<workspace>/prefect-results`), and every task and subflow it calls inherits that,
  as they would inherit a flow's `result_storage`. Deleting the workspace also forgets the cache, so a cache hit
  never points at a missing catalog.
"""
from __future__ import annotations

import base64
import functools
import inspect
import re
import typing
from pathlib import Path
from typing import Callable, TypeVar

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


# ---- Prefect --------------------------------------------------------------------------------------
class PrefectTask:
    """`prefect.task(**options)(fn)`, built the first time it is called, mapped, submitted or given options — so
    importing a stage module never imports Prefect (a torchrun rank, a bench script and a test run the plain
    functions). `fn` and `name` are there without building it."""

    def __init__(self, fn, **options):
        functools.update_wrapper(self, fn)
        self.fn, self.options, self.name = fn, options, options.get("name", fn.__name__)
        self._task = None

    @property
    def task(self):
        if self._task is None:
            from prefect import task

            self._task = task(**self.options)(self.fn)
        return self._task

    def __call__(self, *args, **kwargs):
        return self.task(*args, **kwargs)

    def __getattr__(self, attr):   # map, submit, with_options, ...: the Prefect task's
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.task, attr)


def prefect_task(**options):
    """`@prefect.task(**options)`, built on first use (see `PrefectTask`)."""
    return lambda fn: PrefectTask(fn, **options)


def stage_task(name: str, lineage: Callable[..., Lineage], **options):
    """A stage's Prefect task, cached by its fingerprint. The task's parameters are `lineage`'s parameters (and the
    config); `stage_lineage(task, ...)` gives the lineage of a call without running it."""
    def by_fingerprint(context, arguments) -> str:
        return lineage_of(lineage, arguments).fp

    def decorate(fn):
        stage = PrefectTask(fn, name=name, cache_key_fn=by_fingerprint, persist_result=True, **options)
        stage.lineage = lineage
        return stage

    return decorate


class NotCached(LookupError):
    """A stage output that is not in the catalog yet: the stage must run."""


def lineage_of(lineage: Callable[..., Lineage], arguments: dict) -> Lineage:
    """`lineage` applied to the arguments of a task call (a task may take more, e.g. the whole config)."""
    return lineage(**{k: arguments[k] for k in inspect.signature(lineage).parameters if k in arguments})


def stage_lineage(stage, *args, **kwargs) -> Lineage:
    """The lineage of calling the stage task `stage` with these arguments."""
    bound = inspect.signature(stage.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return lineage_of(stage.lineage, bound.arguments)


def from_catalog(config: DistillConfig, stage, *args, **kwargs):
    """What calling the stage task would return, read from the catalog without running anything (no Prefect
    server either); `NotCached` when the stage has not run with these inputs."""
    kind = typing.get_type_hints(stage.fn)["return"]
    done = cached_output(workspace_of(config).catalog(), stage_lineage(stage, *args, **kwargs), kind)
    if done is None:
        raise NotCached(stage.name)
    return done


_SAVED: set[tuple[str, str]] = set()


def use_workspace(config: DistillConfig) -> Workspace:
    """Store this flow run's task results under the config's workspace (see the module docstring)."""
    from prefect.context import FlowRunContext
    from prefect.filesystems import LocalFileSystem
    from prefect.results import resolve_result_storage
    from prefect.settings import PREFECT_API_URL

    ws = workspace_of(config)
    key = (str(PREFECT_API_URL.value()), ws.block_name)  # a saved block, as Prefect requires; one save per server
    if key not in _SAVED:
        LocalFileSystem(basepath=str(ws.results_dir)).save(ws.block_name, overwrite=True)
        _SAVED.add(key)
    run = FlowRunContext.get()
    if run is not None:
        storage = resolve_result_storage(f"local-file-system/{ws.block_name}", _sync=True)
        run.result_store = run.result_store.model_copy(update={"result_storage": storage})
    return ws
