"""Teacher requests as batches (`teacher.api: batch`): the OpenAI Batch API, or vLLM's offline batch runner.

The same items as the online path (custom_id = the rationale id, one request line per item, calling
`teacher.batch_endpoint`), stored exactly as the online path stores them (tasks/teacher.py `result_row`), at the
providers' batch price. Each batch is a row of table `teacher_batches` (the ledger), written at every step:

    prepared   the request JSONL is on disk and its custom ids are in the catalog — before anything is sent
    uploaded   the files API took it (input_file_id)
    submitted  the batch exists on the server (batch_id); it carries metadata {keystep_batch: <batch_key>}
    finished   the server ended it (completed, failed, expired, cancelled); its output and error lines are on disk

A killed run resumes from the ledger: a `prepared` batch is uploaded again (files are not billed); an `uploaded` one
first looks for a batch the server already created with its key (a kill between create and its answer) and adopts
it, so no batch is submitted twice; a `submitted` one is polled; a `finished` one is read again from disk. An item is
sent in a new batch only when no open batch holds it and no finished one answered it. Lines that failed (a 5xx or
429 line, a batch that failed, expired or was cancelled before reaching them) are asked again in a new batch, up to
`teacher.max_retries` rounds, and after that by the next run. A line whose body is a protocol fault (no choices, not
JSON, empty text) is asked again the same way, as the online path retries it; one still faulty after the last round
is stored as a failed row with its reason, and a rerun asks again (`teacher.retry_failed`) — a finished batch's
faulty line is never taken as that item's answer. Requests beyond `batch_max_requests` lines or
`batch_max_bytes` bytes go into several batches, polled together.

`runner` 'openai': any OpenAI-compatible server with the files and batches endpoints, through the `openai` client.
`runner` 'vllm': `python -m vllm.entrypoints.openai.run_batch` from `teacher.vllm_python` on the request file (no
server, no HTTP); it writes the same output lines.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from keystep.config import TeacherConfig
from storage.workspace import write_atomic
from tasks.teacher_backends import (PROTOCOL_FAULTS, GenerationRequest, GenerationResult, TeacherUnavailable,
                                    _parse_response, request_params)

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Batch:
    """One ledger row, as the backend works with it."""
    key: str
    custom_ids: list[str]
    request_path: str
    status: str = "prepared"
    input_file_id: str | None = None
    batch_id: str | None = None
    server_status: str | None = None
    output_path: str | None = None
    error_path: str | None = None


class Ledger:
    """Table `teacher_batches` for one teacher (only the flow process writes it)."""

    def __init__(self, catalog, teacher_fp: str, runner: str, endpoint: str | None):
        self.catalog, self.teacher_fp, self.runner, self.endpoint = catalog, teacher_fp, runner, endpoint

    def all(self) -> list[Batch]:
        return [Batch(key=r["batch_key"], custom_ids=list(r["custom_ids"]), request_path=r["request_path"],
                      status=r["status"], input_file_id=r["input_file_id"], batch_id=r["batch_id"],
                      server_status=r["server_status"], output_path=r["output_path"], error_path=r["error_path"])
                for r in self.catalog.query("batches_of_teacher", teacher_fp=self.teacher_fp)
                if r["runner"] == self.runner]

    def record(self, batch: Batch) -> None:
        self.catalog.query("batch_recorded", batch_key=batch.key, teacher_fp=self.teacher_fp, runner=self.runner,
                           endpoint=self.endpoint, custom_ids=batch.custom_ids, request_path=batch.request_path)

    def update(self, batch: Batch, **changes: Any) -> None:
        for k, v in changes.items():
            if hasattr(batch, k):
                setattr(batch, k, v)
        values = {k: None for k in ("status", "input_file_id", "batch_id", "server_status", "request_counts",
                                    "output_path", "error_path", "error")}
        values.update({k: json.dumps(v) if k == "request_counts" and v is not None else v for k, v in changes.items()})
        self.catalog.query("batch_updated", batch_key=batch.key, **values)


def request_line(cfg: TeacherConfig, model: str, req: GenerationRequest, custom_id: str) -> dict:
    """One request of a batch: what the online path would send, as a Batch API line."""
    body = request_params(cfg, model, req)
    if cfg.batch_endpoint == "chat":
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt
    return {"custom_id": custom_id, "method": "POST",
            "url": "/v1/chat/completions" if cfg.batch_endpoint == "chat" else "/v1/completions", "body": body}


def chunks(lines: list[tuple[str, str]], max_requests: int, max_bytes: int) -> list[list[tuple[str, str]]]:
    """(custom_id, JSON line) split so no batch has more than `max_requests` lines or `max_bytes` bytes."""
    out, current, size = [], [], 0
    for cid, line in lines:
        n = len(line.encode()) + 1
        if current and (len(current) >= max_requests or size + n > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append((cid, line))
        size += n
    return out + [current] if current else out


def read_lines(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def line_result(line: dict, api: str) -> GenerationResult | None:
    """An output line as the online path's result; None for a line that did not get an answer (asked again)."""
    response = line.get("response") or {}
    if line.get("error") or response.get("status_code") != 200:
        return None
    body = response.get("body")
    return _parse_response(body if isinstance(body, str) else json.dumps(body), api)


class BatchTeacher:
    """`generate` yields (request, result) for every item a batch answered; see the module docstring."""

    def __init__(self, cfg: TeacherConfig, ledger: Ledger, spool: Path, model: str,
                 custom_id: Callable[[GenerationRequest], str], api_key: str | None = None,
                 base_url: str | None = None, on_progress: Callable[[dict], None] | None = None):
        """`custom_id`: a request's rationale id, which its line carries."""
        self.cfg, self.ledger, self.spool, self.model, self.custom_id = cfg, ledger, Path(spool), model, custom_id
        self.base_url, self._api_key, self.on_progress = base_url, api_key, on_progress
        self.spool.mkdir(parents=True, exist_ok=True)
        self._client = None

    # -- the server ----------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key or "no-key",
                                         timeout=self.cfg.timeout_s, max_retries=self.cfg.max_retries)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        """A files/batches call; a server without those endpoints, or that stopped answering, is TeacherUnavailable."""
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.NotFoundError as err:
            if what in ("upload", "list"):
                raise TeacherUnavailable(
                    f"teacher endpoint {self.base_url} does not implement the OpenAI files/batches API ({what} answered "
                    "404); teacher.api 'batch' needs it — use teacher.api: completions (or chat) there") from None
            raise TeacherUnavailable(f"teacher endpoint {self.base_url}: {what} answered 404: {err}") from None
        except (openai.APIStatusError, openai.APIConnectionError, openai.APITimeoutError) as err:
            raise TeacherUnavailable(f"teacher endpoint {self.base_url}: {what} failed after {self.cfg.max_retries} "
                                     f"retries ({type(err).__name__}: {str(err)[:200]}); batches so far are in table "
                                     "teacher_batches, a rerun resumes them") from None

    def _advance(self, batch: Batch) -> None:
        """Move an open batch one step on: upload, create (or adopt), poll, download."""
        if self.ledger.runner == "vllm":
            return self._run_vllm(batch)
        c = self.client()
        if batch.status == "prepared":
            with open(batch.request_path, "rb") as f:
                uploaded = self._call("upload", c.files.create, file=f, purpose="batch")
            self.ledger.update(batch, status="uploaded", input_file_id=uploaded.id)
        if batch.status == "uploaded":
            adopted = next((b for b in self._call("list", c.batches.list, limit=100)
                            if (b.metadata or {}).get("keystep_batch") == batch.key), None)
            created = adopted or self._call(
                "create", c.batches.create, input_file_id=batch.input_file_id,
                endpoint="/v1/chat/completions" if self.cfg.batch_endpoint == "chat" else "/v1/completions",
                completion_window=self.cfg.batch_completion_window, metadata={"keystep_batch": batch.key})
            self.ledger.update(batch, status="submitted", batch_id=created.id, server_status=created.status)
        if batch.status == "submitted":
            remote = self._call("poll", c.batches.retrieve, batch.batch_id)
            counts = remote.request_counts.model_dump() if remote.request_counts else None
            self.ledger.update(batch, server_status=remote.status, request_counts=counts)
            if self.on_progress:
                self.on_progress({"batch": batch.key, "status": remote.status, **(counts or {})})
            if remote.status in TERMINAL:
                paths = {}
                for kind, file_id in (("output", remote.output_file_id), ("error", remote.error_file_id)):
                    if file_id:
                        path = self.spool / f"{batch.key}-{kind}.jsonl"
                        write_atomic(path, self._call("download", c.files.content, file_id).text)
                        paths[f"{kind}_path"] = str(path)
                self.ledger.update(batch, status="finished", **paths)

    def _run_vllm(self, batch: Batch) -> None:
        """vLLM's offline runner on the request file: it finishes the batch (or fails) in one go."""
        cfg = self.cfg
        if not cfg.vllm_python or not Path(cfg.vllm_python).exists():
            raise ValueError("config key 'teacher.vllm_python': api 'batch' with backend 'vllm' runs vLLM's run_batch "
                             "from a vLLM environment's python (see `make test-vllm`)")
        out, log = self.spool / f"{batch.key}-output.jsonl", self.spool / f"{batch.key}-vllm.log"
        cmd = [cfg.vllm_python, "-m", "vllm.entrypoints.openai.run_batch", "-i", batch.request_path, "-o",
               str(out) + ".part", "--model", cfg.model, "--served-model-name", self.model, "--seed", str(cfg.seed or 0),
               *cfg.vllm_args]
        self.ledger.update(batch, status="submitted", server_status="in_progress")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        with open(log, "ab") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0 or not Path(str(out) + ".part").exists():
            self.ledger.update(batch, server_status="failed", error=f"run_batch exited with {code}; log {log}")
            raise TeacherUnavailable(f"vLLM run_batch exited with code {code}; log {log}:\n"
                                     + log.read_text(errors="replace")[-1500:])
        os.replace(str(out) + ".part", out)
        self.ledger.update(batch, status="finished", server_status="completed", output_path=str(out))

    # -- the items ---------------------------------------------------------------------------------------
    def _new_batch(self, lines: list[tuple[str, str]]) -> Batch:
        key = f"kb-{uuid.uuid4().hex[:16]}"
        path = self.spool / f"{key}-requests.jsonl"
        write_atomic(path, "".join(line + "\n" for _, line in lines))
        batch = Batch(key=key, custom_ids=[cid for cid, _ in lines], request_path=str(path))
        self.ledger.record(batch)   # in the catalog before anything is sent
        return batch

    def _answers(self, batch: Batch, faults: dict[str, GenerationResult]) -> dict[str, GenerationResult]:
        """A finished batch's answered lines; a line that is a protocol fault goes into `faults` instead (asked again)."""
        out = {}
        for line in read_lines(batch.output_path) + read_lines(batch.error_path):
            result = line_result(line, self.cfg.request_api)
            if result is None:
                continue
            if result.status == "failed" and (result.reason or "").startswith(PROTOCOL_FAULTS):
                faults[line["custom_id"]] = result
            else:
                out[line["custom_id"]] = result
        return out

    def generate(self, requests: list[GenerationRequest]) -> Iterator[tuple[GenerationRequest, GenerationResult]]:
        todo = {self.custom_id(r): r for r in requests}
        faults: dict[str, GenerationResult] = {}      # the last protocol-fault line of an item still to answer
        known = self.ledger.all()
        for batch in known:                    # answers already downloaded: read again, never paid again
            if batch.status == "finished":
                for cid, result in self._answers(batch, faults).items():
                    if cid in todo:
                        yield todo.pop(cid), result
        open_ = [b for b in known if b.status != "finished" and set(b.custom_ids) & set(todo)]
        for round_ in range(self.cfg.max_retries + 1):
            held = {cid for b in open_ for cid in b.custom_ids}
            fresh = [(cid, json.dumps(request_line(self.cfg, self.model, todo[cid], cid))) for cid in todo if cid not in held]
            open_ += [self._new_batch(c) for c in chunks(fresh, self.cfg.batch_max_requests, self.cfg.batch_max_bytes)]
            while open_:
                for batch in list(open_):
                    self._advance(batch)
                    if batch.status == "finished":
                        open_.remove(batch)
                        for cid, result in self._answers(batch, faults).items():
                            if cid in todo:
                                yield todo.pop(cid), result
                if open_:
                    time.sleep(self.cfg.batch_poll_s)
            if not todo:
                return
        # still unanswered after max_retries rounds: a protocol fault is stored as a failed row with its reason (counted,
        # asked again by the next run, as online); an item with no answer at all is not stored, so the next run asks again
        for cid in [c for c in todo if c in faults]:
            yield todo.pop(cid), faults[cid]


