"""The openai backend against a real local HTTP server speaking the OpenAI protocol, with injected faults.
Request counts are what the server received."""
import pytest

from keystep.config import SyntheticDatasetSpec, teacher_config
from tests.fake_openai import FakeOpenAI
from tasks.teacher import spool_dir
from tests.tasks.helpers import generate_with, ingest_spec
from tasks.teacher_backends import TeacherUnavailable


def dataset(catalog, n=40, seed=0):
    spec = SyntheticDatasetSpec(n=n, seed=seed, max_steps=2)
    dfp = ingest_spec(catalog, spec)
    answers = {r["question"]: r["answer"] for r in catalog.query("examples_of_dataset", dataset_fp=dfp.fp)}
    return dfp, answers


def teacher(server, **kw):
    base = {"backend": "openai", "base_url": server.base_url if server else "http://127.0.0.1:9/v1", "model": "fake",
            "concurrency": 8, "timeout_s": 1.0, "max_retries": 2}
    return teacher_config(**{**base, **kw})


def run(catalog, cfg, dfp):
    return generate_with(catalog, cfg, dfp)


def test_usage_latency_and_correctness_are_stored(catalog):
    dfp, answers = dataset(catalog)
    with FakeOpenAI(answers=answers) as server:
        s = run(catalog, teacher(server), dfp)
    assert s.n == 40 and s.correct_rate == 1.0 and server.requests == 40
    assert s.completion_tokens > 0 and s.prompt_tokens > 0
    row = catalog.execute("select * from rationales limit 1")[0]
    assert row["finish_reason"] == "stop" and row["latency_s"] > 0 and '"completion_tokens"' in row["usage_json"]


def test_chat_api_with_few_shot(catalog):
    dfp, answers = dataset(catalog, n=10)
    cfg = teacher(None, api="chat", system_prompt="Be brief.",
                  few_shot=[{"question": "1+1?", "rationale": "1 + 1 = 2.", "answer": "2"}])
    with FakeOpenAI(answers=answers) as server:
        s = run(catalog, cfg.model_copy(update={"base_url": server.base_url}), dfp)
    assert s.n_ok == 10 and s.correct_rate == 1.0


def test_429_5xx_and_timeouts_are_retried(catalog):
    dfp, answers = dataset(catalog)
    faults = {"429": 0.2, "500": 0.15, "503": 0.1, "timeout": 0.1}
    with FakeOpenAI(answers=answers, faults=faults, fail_attempts=1, timeout_sleep_s=6) as server:
        s = run(catalog, teacher(server, timeout_s=3.0), dfp)
        faulty = [p for p in server.attempts if server.fault_for(p)]
    assert s.n_ok == 40 and s.n_failed == 0
    assert faulty and all(server.attempts[p] >= 2 for p in faulty)  # failed, then retried
    assert {server.fault_for(p) for p in faulty} == {"429", "500", "503", "timeout"}


def test_twenty_percent_faults_of_every_kind_lose_nothing_and_pay_nothing_twice(catalog):
    """Counted from the server's side: every question gets a rationale, and no well-formed reply is delivered twice."""
    from tests.fake_openai import KINDS

    dfp, answers = dataset(catalog, n=120)
    faults = {k: 0.2 / len(KINDS) for k in KINDS}
    with FakeOpenAI(answers=answers, faults=faults, fail_attempts=1, timeout_sleep_s=3) as server:
        s = run(catalog, teacher(server, timeout_s=1.0), dfp)
        faulty = {server.fault_for(p) for p in server.attempts if server.fault_for(p)}
        assert faulty == set(KINDS)                                   # every kind was injected
        assert len(server.served) == 120 and set(server.served.values()) == {1}   # 0 lost, 0 paid twice
    assert s.n_ok == 120 and s.n_failed == 0 and s.correct_rate == 1.0


def test_protocol_faults_are_retried_then_stored_with_the_reason_and_a_rerun_asks_again(catalog):
    dfp, answers = dataset(catalog)
    cfg = teacher(None, max_retries=2)
    with FakeOpenAI(answers=answers, faults={"malformed": 0.2, "empty": 0.2, "no_choices": 0.1}, fail_attempts=99) as server:
        s = run(catalog, cfg.model_copy(update={"base_url": server.base_url}), dfp)
        expected = {k: sum(1 for p in server.attempts if server.fault_for(p) == k) for k in ("malformed", "empty", "no_choices")}
        faulty = {p for p in server.attempts if server.fault_for(p)}
        assert all(server.attempts[p] == 3 for p in faulty)              # retried max_retries times, as 429/5xx are
        assert all(server.attempts[p] == 1 for p in server.attempts if p not in faulty)
    reasons = s.failure_reasons
    assert reasons.get("malformed response (JSONDecodeError)", 0) == expected["malformed"]
    assert reasons.get("empty response", 0) == expected["empty"]
    assert reasons.get("malformed response (IndexError)", 0) == expected["no_choices"]
    raw = catalog.execute("select text from rationales where reason like 'malformed response (JSONDecodeError)%' limit 1")
    assert not expected["malformed"] or raw[0]["text"] == "<html>upstream error</html>"
    # the endpoint recovers: a rerun asks exactly for the failed items, never for the ones that succeeded
    with FakeOpenAI(answers=answers) as healthy:
        again = run(catalog, cfg.model_copy(update={"base_url": healthy.base_url}), dfp)
        assert set(healthy.attempts) == faulty and healthy.requests == len(faulty)
    assert again.n_ok == 40 and again.n_failed == 0 and again.n == 40
    # ... and with retry_failed off nothing is asked again
    with FakeOpenAI(answers=answers) as third:
        run(catalog, cfg.model_copy(update={"base_url": third.base_url, "retry_failed": False}), dfp)
        assert third.requests == 0


def test_unreachable_endpoint_fails_naming_it(catalog):
    dfp, _ = dataset(catalog, n=10)
    cfg = teacher(None, max_retries=0, max_consecutive_failures=3, concurrency=1)
    with pytest.raises(TeacherUnavailable, match=r"127\.0\.0\.1:9/v1 failed 3 requests in a row.*APIConnectionError"):
        run(catalog, cfg, dfp)


def test_killed_run_restarted_sends_no_request_for_stored_items(catalog):
    dfp, answers = dataset(catalog, n=60)
    cfg = teacher(None, max_retries=0, max_consecutive_failures=2, concurrency=1, commit_every=4)
    with FakeOpenAI(answers=answers, die_after=25) as dying:  # the endpoint goes down mid-run
        with pytest.raises(TeacherUnavailable):
            run(catalog, cfg.model_copy(update={"base_url": dying.base_url}), dfp)
        first_ok = set(dying.served)
    assert len(first_ok) == 25
    assert list(spool_dir(catalog, cfg).glob("results-*.parquet"))  # finished work kept in the spool
    with FakeOpenAI(answers=answers) as healthy:
        s = run(catalog, cfg.model_copy(update={"base_url": healthy.base_url}), dfp)
        second = set(healthy.attempts)
    assert s.n == 60 and s.n_ok == 60
    assert not (first_ok & second)  # nothing stored was asked again
    assert healthy.requests == 60 - len(first_ok)


def test_new_dataset_version_requests_exactly_the_new_questions(catalog):
    with FakeOpenAI() as server:
        small, _ = dataset(catalog, n=100)
        run(catalog, teacher(server), small)
        assert server.requests == 100
        bigger, _ = dataset(catalog, n=110)  # same generator: the first 100 questions plus 10 new
        run(catalog, teacher(server), bigger)
        assert server.requests == 110


def test_operational_settings_do_not_change_the_teacher_fingerprint():
    from tasks.teacher import teacher_fingerprint
    a = teacher(None)
    assert teacher_fingerprint(a) == teacher_fingerprint(a.model_copy(update={"concurrency": 64, "timeout_s": 5, "base_url": "http://x/v1"}))
    assert teacher_fingerprint(a) != teacher_fingerprint(a.model_copy(update={"temperature": 0.7}))
