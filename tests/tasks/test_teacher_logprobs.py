"""`teacher.logprobs: k`: the teacher's top-k log-probabilities kept for every generated token, against a real local
HTTP server speaking the OpenAI protocol (completions `logprobs`, chat `top_logprobs`, vLLM's token ids)."""
import numpy as np
import pytest

from tasks.teacher_backends import LogprobsUnavailable
from tasks.teacher_logprobs import load_captured
from tests.fake_openai import FakeOpenAI
from tests.tasks.test_teacher_openai import dataset, run, teacher


def stored(catalog):
    rows = catalog.execute("select rationale_id, text from rationales where status = 'ok'")
    return rows, load_captured(catalog, catalog.path.parent, [r["rationale_id"] for r in rows])


def test_vllm_server_tokens_come_as_ids_with_their_top_k_likeliest_first(catalog):
    import hashlib
    import re

    dfp, answers = dataset(catalog, n=12)
    from keystep.config import teacher_config
    cfg = teacher_config(backend="vllm", model="teacher-folder", logprobs=5, concurrency=4, max_retries=2)
    with FakeOpenAI(answers=answers) as server:   # the server keystep would start: reached at its URL
        s = run_at(catalog, cfg, dfp, server.base_url)
    rows, captured = stored(catalog)
    assert s.n_ok == 12 and len(captured) == 12 and s.logprob_tokens == sum(len(c.tokens) for c in captured.values())
    assert s.logprob_bytes_per_token and s.logprob_bytes_per_token > 0
    for r in rows:
        lp = captured[r["rationale_id"]]
        words = re.findall(r"\s*\S+", r["text"])
        ids = [int(hashlib.sha256(w.encode()).hexdigest()[:6], 16) % 1000 for w in words]
        assert lp.tokens == ids                                     # the generated tokens, as ids
        assert [t[0] for t in lp.top] == ids and all(len(t) == 5 for t in lp.top)
        assert np.allclose(lp.top_logprobs, [[-0.1, -2.0, -3.0, -4.0, -5.0]] * len(ids), atol=2e-3)  # float16
    # ... and the exported rationales carry them as columns
    from keystep.config import DistillConfig, StorageConfig
    from storage.workspace import Workspace
    from tasks.export import ExportInputs, rationale_rows

    ws = Workspace(catalog.path.parent)
    exported = rationale_rows(ws, DistillConfig(teacher=cfg, storage=StorageConfig(workspace=str(ws.root))),
                              ExportInputs(generation=s))
    assert len(exported) == 12
    for row in exported:
        lp = captured[row["rationale_id"]]
        assert row["generated_tokens"] == lp.tokens and row["generated_topk"] == lp.top
        assert row["generated_topk_logprobs"] == lp.top_logprobs


def run_at(catalog, cfg, dfp, endpoint):
    from tests.tasks.helpers import generate_with
    return generate_with(catalog, cfg, dfp, endpoint=endpoint)


def test_chat_top_logprobs_of_an_endpoint_without_ids_are_kept_as_token_strings(catalog):
    dfp, answers = dataset(catalog, n=6)
    with FakeOpenAI(answers=answers) as server:
        s = run(catalog, teacher(server, api="chat", logprobs=3), dfp)
    rows, captured = stored(catalog)
    assert s.n_ok == 6 and len(captured) == 6
    for r in rows:
        lp = captured[r["rationale_id"]]
        assert "".join(lp.tokens) == r["text"] and [t[0] for t in lp.top] == lp.tokens
        assert [len(t) for t in lp.top] == [3] * len(lp.tokens)


def test_faults_lose_no_logprobs_and_pay_nothing_twice_and_a_rerun_asks_nothing(catalog):
    dfp, answers = dataset(catalog, n=60)
    faults = {"429": 0.1, "500": 0.05, "malformed": 0.05}
    cfg = teacher(None, logprobs=4, commit_every=8)
    with FakeOpenAI(answers=answers, faults=faults, fail_attempts=1) as server:
        s = run(catalog, cfg.model_copy(update={"base_url": server.base_url}), dfp)
        assert len(server.served) == 60 and set(server.served.values()) == {1}
    _, captured = stored(catalog)
    assert s.n_ok == 60 and len(captured) == 60
    assert catalog.execute("select count(*) as n from generation_logprobs")[0]["n"] == 60
    with FakeOpenAI(answers=answers) as again:
        run(catalog, cfg.model_copy(update={"base_url": again.base_url}), dfp)
        assert again.requests == 0


def test_an_endpoint_that_returns_no_logprobs_is_one_line_naming_the_setting_and_stores_nothing(catalog):
    dfp, answers = dataset(catalog, n=8)
    with FakeOpenAI(answers=answers, logprobs=False) as server:
        with pytest.raises(LogprobsUnavailable, match=r"config key 'teacher.logprobs'.*teacher.logprobs: 0"):
            run(catalog, teacher(server, logprobs=5, concurrency=1), dfp)
    assert catalog.execute("select count(*) as n from generation_logprobs")[0]["n"] == 0


def test_k_above_a_vllm_servers_cap_is_one_line_naming_the_flag_and_stores_nothing(catalog):
    """A vLLM server someone else started, its --max-logprobs below teacher.logprobs: vLLM refuses each request (400);
    keystep stops at the first refusal with one line naming the setting and the server flag, not after 20 failures."""
    from keystep.config import teacher_config

    dfp, answers = dataset(catalog, n=8)
    cfg = teacher_config(backend="vllm", model="teacher-folder", logprobs=5, concurrency=1, max_retries=0)
    with FakeOpenAI(answers=answers, max_logprobs=4) as server:
        with pytest.raises(LogprobsUnavailable, match=r"'teacher.logprobs': 5 .*above the cap.*--max-logprobs 5"):
            run_at(catalog, cfg, dfp, server.base_url)
        assert server.requests <= 2
    assert catalog.execute("select count(*) as n from rationales")[0]["n"] == 0


def test_logprobs_change_no_fingerprint_and_are_refused_for_batches():
    from pydantic import ValidationError

    from tasks.teacher import teacher_fingerprint
    a = teacher(None)
    assert teacher_fingerprint(a) == teacher_fingerprint(a.model_copy(update={"logprobs": 20}))   # never re-pays text
    with pytest.raises(ValidationError, match="teacher.logprobs is not kept for api 'batch'"):
        teacher(None, logprobs=5, api="batch")
