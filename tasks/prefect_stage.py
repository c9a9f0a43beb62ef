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


def in_workspace(stage, workspace: Workspace):
    """The stage task with its results stored under `workspace` (a saved block, as Prefect requires)."""
    block = LocalFileSystem(basepath=str(workspace.results_dir))
    block.save(workspace.block_name, overwrite=True)
    return stage.with_options(result_storage=f"local-file-system/{workspace.block_name}")
