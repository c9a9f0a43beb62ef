"""The generate flow against a real local OpenAI-protocol server: sharded over prefect-dask's DaskTaskRunner
on a local cluster, and an API key that reaches the server but nothing keystep or Prefect keeps."""
import asyncio
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.conftest import micro_config


def openai_config(ws, server, **teacher):
    from keystep.config import teacher_config

    cfg = micro_config(ws)   # the backend is a kind of teacher config: built anew, not copied from the reference one
    return cfg.model_copy(update={"teacher": teacher_config(**{
        **cfg.teacher.model_dump(), "backend": "openai", "base_url": server.base_url, "model": "fake",
        "keep_only_correct": False, **teacher})})


@pytest.mark.slow
def test_generation_shards_run_on_a_dask_cluster(prefect_api, tmp_path):
    from prefect_dask import DaskTaskRunner

    from flows.distill import generate
    from storage.workspace import Workspace

    with FakeOpenAI() as server:
        cfg = openai_config(tmp_path / "ws", server, shards=4, concurrency=4)
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": None})
        out = generate.with_options(task_runner=runner)(config=cfg)
        n = out.train_dataset.n_examples
        assert out.generation.n == n == server.requests  # every item asked exactly once
        assert all(v == 1 for v in server.served.values())
    cat = Workspace(tmp_path / "ws").catalog()
    assert cat.execute("select count(*) as n from rationales")[0]["n"] == n
    assert not list((tmp_path / "ws" / "spool").rglob("*.parquet"))  # all parts ingested by the flow process


def _prefect_logs_and_artifacts() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(), limit=200)
            artifacts = await client.read_artifacts(limit=200)
            runs = await client.read_flow_runs(limit=200)
            task_runs = await client.read_task_runs(limit=200)
            return " ".join([*(l.message for l in logs), *(str(a.data) + str(a.description) for a in artifacts),
                             *(str(r.parameters) for r in runs), *(str(t.task_inputs) for t in task_runs)])

    return asyncio.run(read())


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_api_key_from_env_and_secret_block_never_stored(prefect_api, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from flows.distill import generate

    env_key, block_key = "sk-env-Zq81xTopSecret", "sk-block-Pw72yTopSecret"
    monkeypatch.setenv("KEYSTEP_TEST_API_KEY", env_key)
    Secret(value=block_key).save("keystep-test-teacher-key", overwrite=True)
    with FakeOpenAI() as server:
        generate(config=openai_config(tmp_path / "ws", server, api_key_env="KEYSTEP_TEST_API_KEY"))
        generate(config=openai_config(tmp_path / "ws2", server, api_key_secret="keystep-test-teacher-key",
                                      temperature=0.5))
        assert server.auth_headers == {f"Bearer {env_key}", f"Bearer {block_key}"}  # the keys did reach the endpoint
    for key in (env_key, block_key):
        assert not _files_containing(tmp_path, key.encode()), "key written under the workspace"
        assert key not in _prefect_logs_and_artifacts(), "key in Prefect logs, artifacts or run parameters"
    db = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    db_path = Path(db.split("///", 1)[-1]) if db.startswith("sqlite") else None
    if db_path and db_path.exists():  # the env-var key must not be anywhere in Prefect's own database
        assert env_key.encode() not in db_path.read_bytes()


@pytest.mark.slow
def test_a_rerun_of_the_generate_flow_asks_again_only_for_failed_items(prefect_api, tmp_path):
    from flows.distill import generate
    from storage.workspace import Workspace

    with FakeOpenAI(faults={"malformed": 0.2, "no_choices": 0.1}, fail_attempts=99) as flaky:
        first = generate(config=openai_config(tmp_path / "ws", flaky, max_retries=1)).generation
        failed = {p for p in flaky.attempts if flaky.fault_for(p)}
    assert first.n_failed == len(failed) > 0
    with FakeOpenAI() as healthy:
        again = generate(config=openai_config(tmp_path / "ws", healthy, max_retries=1)).generation
        assert set(healthy.attempts) == failed                            # only what failed, once each
    assert again.fp == first.fp and again.n_failed == 0 and again.n_ok == again.n == first.n
    rows = Workspace(tmp_path / "ws").catalog().execute("select status, count(*) as n from rationales group by status")
    assert rows == [{"status": "ok", "n": first.n}]                       # failed rows replaced, none duplicated
