"""`teacher.api: batch` against a real local HTTP server with the OpenAI files and batches endpoints, with injected
faults and kills. Counted at the server: every item answered, none answered (paid) twice, no batch submitted twice."""
import os
import signal
import subprocess
import sys
import time

import pytest

from keystep.config import teacher_config
from tasks.teacher_backends import TeacherUnavailable
from tests.conftest import ROOT
from tests.fake_openai_batch import FakeBatchOpenAI
from tests.tasks.helpers import generate_with
from tests.tasks.test_teacher_openai import dataset


def teacher(server, **kw):
    base = {"backend": "openai", "base_url": server.base_url, "model": "fake", "api": "batch", "batch_poll_s": 0.01,
            "timeout_s": 5.0, "max_retries": 3}
    return teacher_config(**{**base, **kw})


def rows(catalog):
    return {r["example_id"]: r for r in catalog.execute("select * from rationales where status = 'ok'")}


def test_a_batch_stores_what_the_online_path_stores_and_a_rerun_submits_nothing(catalog, tmp_path):
    from storage.catalog import Catalog

    dfp, answers = dataset(catalog, n=60)
    with FakeBatchOpenAI(answers=answers) as server:
        out = generate_with(catalog, teacher(server), dfp)
        assert out.n_ok == 60 and out.correct_rate == 1.0 and server.created == 1
        assert max(server.served.values()) == 1 and len(server.served) == 60
        again = generate_with(catalog, teacher(server), dfp)          # finished: nothing to ask
        assert again.n_ok == 60 and server.created == 1 and sum(server.served.values()) == 60
        online = Catalog(tmp_path / "online" / "catalog.duckdb")
        generate_with(online, teacher(server, api="completions"), dataset(online, n=60)[0])
    batch, direct = rows(catalog), rows(online)
    assert set(batch) == set(direct)
    for k in batch:   # the same item, stored the same way (teacher fingerprint included: switching never pays twice)
        for col in ("rationale_id", "teacher_fp", "prompt", "text", "extracted_answer", "correct", "finish_reason",
                    "usage_json"):
            assert batch[k][col] == direct[k][col], col
    ledger = catalog.execute("select status, server_status, custom_ids from teacher_batches")
    assert [(r["status"], r["server_status"], len(r["custom_ids"])) for r in ledger] == [("finished", "completed", 60)]


def test_failed_and_expired_batches_and_error_lines_lose_nothing_and_pay_nothing_twice(catalog):
    dfp, answers = dataset(catalog, n=80)
    with FakeBatchOpenAI(answers=answers, batch_faults=["fail", "expire"], line_errors=0.2, partial=0.5) as server:
        out = generate_with(catalog, teacher(server), dfp)
    assert out.n_ok == 80 and out.n_failed == 0                    # 0 lost
    assert max(server.served.values()) == 1 and len(server.served) == 80   # 0 paid twice, counted at the server
    assert server.created == 4   # failed (all again) -> expired (half again) -> error lines again -> done
    statuses = [r["server_status"] for r in catalog.execute("select server_status from teacher_batches order by created_at")]
    assert statuses == ["failed", "expired", "completed", "completed"]


def test_lines_without_choices_are_asked_again_within_the_run(catalog):
    """A 200 line whose body has no choices is a protocol fault, not the item's answer: asked again in a new batch,
    as the online path retries it."""
    dfp, answers = dataset(catalog, n=100)
    with FakeBatchOpenAI(answers=answers, malformed_lines=0.2) as server:
        out = generate_with(catalog, teacher(server), dfp)
    assert server.malformed >= 10 and out.n_ok == 100 and out.n_failed == 0      # 0 lost at a 20% fault rate
    assert server.created == 2 and max(server.served.values()) == 1 and len(server.served) == 100


def test_lines_still_without_choices_after_the_retries_are_failed_rows_a_rerun_asks_again(catalog):
    """With no retry round left the faulty lines are stored as failed rows with their reason; the rerun does not re-read
    the finished batch's faulty lines as final answers but sends them in a new batch."""
    dfp, answers = dataset(catalog, n=40)
    with FakeBatchOpenAI(answers=answers, malformed_lines=0.25) as server:
        out = generate_with(catalog, teacher(server, max_retries=0), dfp)
        faulty = server.malformed
        assert faulty >= 3 and out.n_failed == faulty and out.failure_reasons == {"malformed response (IndexError)": faulty}
        again = generate_with(catalog, teacher(server, max_retries=0), dfp)
    assert again.n_ok == 40 and again.n_failed == 0 and server.created == 2
    assert max(server.served.values()) == 1 and len(server.served) == 40


def test_an_expired_batch_with_nothing_returned_is_asked_again(catalog):
    dfp, answers = dataset(catalog, n=20)
    with FakeBatchOpenAI(answers=answers, batch_faults=["expire"], partial=0.0) as server:
        out = generate_with(catalog, teacher(server), dfp)
    assert out.n_ok == 20 and server.created == 2 and max(server.served.values()) == 1


def test_requests_beyond_the_limits_go_in_several_batches(catalog):
    dfp, answers = dataset(catalog, n=50)
    with FakeBatchOpenAI(answers=answers) as server:
        out = generate_with(catalog, teacher(server, batch_max_requests=20), dfp)
    assert out.n_ok == 50 and server.created == 3
    sizes = sorted(len(r["custom_ids"]) for r in catalog.execute("select custom_ids from teacher_batches"))
    assert sizes == [10, 20, 20]


class Killed(BaseException):
    """Stands for a SIGKILL at an exact point: nothing after it runs, the catalog keeps what was committed."""


def test_a_kill_between_upload_and_create_or_before_the_create_is_recorded_never_submits_twice(catalog, monkeypatch):
    from tasks import teacher_batch

    dfp, answers = dataset(catalog, n=30)
    real = teacher_batch.Ledger.update
    with FakeBatchOpenAI(answers=answers) as server:
        def kill_after(status):
            def update(self, batch, **changes):
                real(self, batch, **changes)
                if changes.get("status") == status:
                    raise Killed(status)
            return update

        monkeypatch.setattr(teacher_batch.Ledger, "update", kill_after("uploaded"))   # file uploaded, no batch yet
        with pytest.raises(Killed):
            generate_with(catalog, teacher(server), dfp)
        assert server.created == 0
        import openai
        create = openai.resources.batches.Batches.create

        def created_then_killed(self, *a, **kw):   # the server creates the batch; its answer never reaches us
            create(self, *a, **kw)
            raise Killed("create")

        monkeypatch.setattr(teacher_batch.Ledger, "update", real)
        monkeypatch.setattr(openai.resources.batches.Batches, "create", created_then_killed)
        with pytest.raises(Killed):
            generate_with(catalog, teacher(server), dfp)
        assert server.created == 1
        monkeypatch.setattr(openai.resources.batches.Batches, "create", create)
        out = generate_with(catalog, teacher(server), dfp)          # adopts the batch the server made for it
    assert out.n_ok == 30 and server.created == 1 and max(server.served.values()) == 1
    assert len(server.files) == 2   # the request file once, then the output file: the upload was not repeated


@pytest.mark.slow
def test_sigkill_while_the_batch_runs_resumes_polling_the_same_batch(tmp_path):
    from storage.catalog import Catalog

    cat = Catalog(tmp_path / "ws" / "catalog.duckdb")
    dfp, answers = dataset(cat, n=40)
    with FakeBatchOpenAI(answers=answers, batch_faults=["hang"]) as server:
        script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from keystep.config import OpenAITeacherConfig, SyntheticDatasetSpec
from storage.catalog import Catalog
from tests.tasks.helpers import generate_with, ingest_spec
cat = Catalog({str(tmp_path / 'ws' / 'catalog.duckdb')!r})
generate_with(cat, OpenAITeacherConfig(backend="openai", base_url={server.base_url!r}, model="fake", api="batch",
              batch_poll_s=0.05, max_retries=3), ingest_spec(cat, SyntheticDatasetSpec(n=40, seed=0, max_steps=2)))
"""
        proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
        deadline = time.monotonic() + 120
        while not (server.batches and next(iter(server.batches.values()))["_polls"] >= 3):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)                        # killed while the batch runs on the server
        proc.wait()
        next(iter(server.batches.values()))["_fault"] = None       # the server finishes it from now on
        out = generate_with(cat, teacher(server), dfp)
    assert out.n_ok == 40 and server.created == 1 and max(server.served.values()) == 1


def test_an_endpoint_without_the_files_api_is_one_line_naming_it(catalog):
    dfp, answers = dataset(catalog, n=5)
    with FakeBatchOpenAI(answers=answers, no_files=True) as server:
        with pytest.raises(TeacherUnavailable, match=f"{server.base_url} does not implement the OpenAI files/batches API"):
            generate_with(catalog, teacher(server, max_retries=0), dfp)
    assert catalog.execute("select count(*) as n from rationales")[0]["n"] == 0


def test_cli_names_an_endpoint_without_the_batch_api_before_any_work(tmp_path):
    with FakeBatchOpenAI(no_files=True) as server:
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "configs/micro.yaml", "--workspace",
                            str(tmp_path / "ws"), "--set", "teacher.backend=openai", "--set", "teacher.model=fake",
                            "--set", f"teacher.base_url={server.base_url}", "--set", "teacher.api=batch"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert server.base_url in r.stderr and "does not implement" in r.stderr
    assert not (tmp_path / "ws" / "catalog.duckdb").exists()
