"""The fake OpenAI server (tests/fake_openai.py) with the Batch API: /v1/files (upload, retrieve, content) and
/v1/batches (create, retrieve, list, cancel) — a real uvicorn server the real `openai` client talks to.

A created batch validates, runs and ends over a few polls (`polls_to_finish` retrieves), then answers each request
line as the online endpoint would. What it answers is counted at the server: `served[prompt]` grows by one for each
line answered 200 in an output file — "paid". Faults, per batch in creation order (`batch_faults`): 'fail' (the batch
fails validation: no output, nothing paid), 'expire' (ends expired with only the first `partial` share of its lines
answered, the rest in the error file as batch_expired), 'hang' (never finishes by itself; cancel ends it with partial
output). `line_errors` (a share of prompts, by hash) makes a line answer 500 in the error file on its first attempt;
`malformed_lines` (another share) makes it answer 200 with a body that has no choices — billed by a real provider,
not counted as served here.
`no_files`: /v1/files answers 404 (an endpoint without the files API).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter

from tests.fake_openai import FakeOpenAI


class FakeBatchOpenAI(FakeOpenAI):
    def __init__(self, batch_faults: list[str | None] | None = None, line_errors: float = 0.0, partial: float = 0.5,
                 polls_to_finish: int = 2, no_files: bool = False, malformed_lines: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.batch_faults, self.line_errors, self.partial = list(batch_faults or []), line_errors, partial
        self.malformed_lines, self.malformed = malformed_lines, 0
        self.polls_to_finish, self.no_files = polls_to_finish, no_files
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.created = 0                        # batches created (a kill must never make this grow for one batch)
        self.line_attempts: Counter[str] = Counter()
        self._block = threading.Lock()

    def _line_error(self, prompt: str, attempt: int) -> bool:
        x = int(hashlib.sha256(("line" + prompt).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return attempt == 1 and x < self.line_errors

    def _line_malformed(self, prompt: str, attempt: int) -> bool:
        x = int(hashlib.sha256(("malformed" + prompt).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return attempt == 1 and x < self.malformed_lines

    def _file(self, content: bytes, purpose: str, filename: str) -> dict:
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                           "filename": filename, "purpose": purpose, "status": "processed", "content": content}
        return self.files[fid]

    def _public(self, obj: dict) -> dict:
        return {k: v for k, v in obj.items() if not k.startswith("_") and k != "content"}

    def _finish(self, batch: dict, status: str) -> None:
        """Answer the batch's lines (all, or a share for expired/cancelled ones) into output and error files."""
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["content"].decode().splitlines() if x.strip()]
        answered = len(lines) if status == "completed" else int(len(lines) * self.partial) if status != "failed" else 0
        out, err = [], []
        for i, line in enumerate(lines):
            body, chat = line["body"], line["url"].endswith("chat/completions")
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            rid = f"batch_req_{batch['id']}_{i}"
            if i >= answered:
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": "batch_expired" if status == "expired" else "batch_cancelled",
                                      "message": f"not processed: batch {status}"}})
                continue
            with self._lock:
                self.line_attempts[prompt] += 1
                attempt = self.line_attempts[prompt]
            if self._line_error(prompt, attempt):
                err.append({"id": rid, "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": rid,
                                         "body": {"error": {"message": "injected line error"}}}})
                continue
            if self._line_malformed(prompt, attempt):
                with self._lock:
                    self.malformed += 1
                out.append({"id": rid, "custom_id": line["custom_id"], "error": None, "response": {
                    "status_code": 200, "request_id": rid, "body": {"id": f"cmpl-{rid}", "object": "text_completion",
                                                                    "model": body.get("model", "fake"), "choices": []}}})
                continue
            text = self.rationale(prompt)
            with self._lock:
                self.served[prompt] += 1
            n_p, n_c = len(prompt.split()), len(text.split())
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                      else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
            out.append({"id": rid, "custom_id": line["custom_id"], "error": None, "response": {
                "status_code": 200, "request_id": rid, "body": {
                    "id": f"cmpl-{rid}", "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": body.get("model", "fake"), "choices": [choice],
                    "usage": {"prompt_tokens": n_p, "completion_tokens": n_c, "total_tokens": n_p + n_c}}}})
        as_file = lambda rows, kind: self._file("".join(json.dumps(r) + "\n" for r in rows).encode(), "batch_output",  # noqa: E731
                                                f"{batch['id']}-{kind}.jsonl")["id"] if rows else None
        batch.update(status=status, output_file_id=as_file(out, "output"), error_file_id=as_file(err, "error"),
                     request_counts={"total": len(lines), "completed": len(out), "failed": len(err)},
                     **{f"{status}_at" if status != "completed" else "completed_at": int(time.time())})
        if status == "failed":
            batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": "injected failure"}]}

    def app(self):
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        app = super().app()

        async def upload(request):
            if self.no_files:
                return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
            form = await request.form()
            f = form["file"]
            return JSONResponse(self._public(self._file(await f.read(), form.get("purpose", "batch"), f.filename)))

        async def file_content(request):
            f = self.files.get(request.path_params["fid"])
            return Response(f["content"], media_type="application/jsonl") if f else JSONResponse({}, status_code=404)

        async def file_info(request):
            f = self.files.get(request.path_params["fid"])
            return JSONResponse(self._public(f)) if f else JSONResponse({}, status_code=404)

        async def batches(request):
            if request.method == "GET":
                if self.no_files:
                    return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
                data = [self._public(b) for b in reversed(list(self.batches.values()))]
                return JSONResponse({"object": "list", "data": data, "has_more": False,
                                     "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})
            body = await request.json()
            with self._block:
                fault = self.batch_faults[self.created] if self.created < len(self.batch_faults) else None
                self.created += 1
                bid = f"batch_{self.created}"
                self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                                     "status": "validating", "output_file_id": None, "error_file_id": None,
                                     "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0},
                                     "metadata": body.get("metadata"), "_fault": fault, "_polls": 0}
            return JSONResponse(self._public(self.batches[bid]))

        async def batch(request):
            b = self.batches.get(request.path_params["bid"])
            if not b:
                return JSONResponse({"error": {"message": "no such batch"}}, status_code=404)
            with self._block:
                if b["status"] not in ("completed", "failed", "expired", "cancelled"):
                    b["_polls"] += 1
                    if b["_fault"] == "fail":
                        self._finish(b, "failed")
                    elif b["_polls"] >= self.polls_to_finish and b["_fault"] != "hang":
                        self._finish(b, "expired" if b["_fault"] == "expire" else "completed")
                    else:
                        b["status"] = "in_progress"
            return JSONResponse(self._public(b))

        async def cancel(request):
            b = self.batches[request.path_params["bid"]]
            with self._block:
                if b["status"] not in ("completed", "failed", "expired", "cancelled"):
                    self._finish(b, "cancelled")
            return JSONResponse(self._public(b))

        app.router.routes += [Route("/v1/files", upload, methods=["POST"]),
                              Route("/v1/files/{fid}/content", file_content, methods=["GET"]),
                              Route("/v1/files/{fid}", file_info, methods=["GET"]),
                              Route("/v1/batches", batches, methods=["GET", "POST"]),
                              Route("/v1/batches/{bid}", batch, methods=["GET"]),
                              Route("/v1/batches/{bid}/cancel", cancel, methods=["POST"])]
        return app
