"""How every stage becomes a Prefect task: cached by its fingerprint, results persisted in the workspace.

The cache key is the stage fingerprint (passed as the `fp` parameter), so inputs stay tiny and exact. Results
are stored through a LocalFileSystem block rooted in the workspace (`<workspace>/prefect-results`): deleting
the workspace also forgets the cache, so a cache hit never points at a missing catalog.
"""
from __future__ import annotations

from prefect import task
from prefect.filesystems import LocalFileSystem

from storage.workspace import Workspace


def by_fingerprint(context, parameters) -> str:
    return parameters["fp"]


def stage_task(name: str, **options):
    return task(name=name, cache_key_fn=by_fingerprint, persist_result=True, **options)


_SAVED: set[tuple[str, str]] = set()


def in_workspace(stage, workspace: Workspace):
    """The stage task with its results stored under `workspace` (a saved block, as Prefect requires)."""
    from prefect.settings import PREFECT_API_URL

    key = (str(PREFECT_API_URL.value()), workspace.block_name)  # one save per server and workspace
    if key not in _SAVED:
        LocalFileSystem(basepath=str(workspace.results_dir)).save(workspace.block_name, overwrite=True)
        _SAVED.add(key)
    return stage.with_options(result_storage=f"local-file-system/{workspace.block_name}")
