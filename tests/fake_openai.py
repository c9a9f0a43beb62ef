"""A local HTTP server speaking the OpenAI protocol (/v1/completions, /v1/chat/completions, /health), with
injected latency and faults, for fault-injection tests and client benchmarks. Not a mock: a real uvicorn
server on loopback that the real `openai` client talks to.

Faults are assigned per prompt, deterministically (hash of the prompt): `faults={"429": 0.2, "500": 0.1}`
makes about 20% of prompts answer 429 and 10% answer 500 on their first `fail_attempts` attempts (then
succeed). Kinds: 429, 500, 503, timeout (sleep past the client's timeout), malformed (200, not JSON),
empty (200, empty text), no_choices (200, JSON without choices), reset (200 whose body stops short of its
Content-Length: the connection closes mid-body).

    python -m tests.fake_openai --port 8000 --latency 0.05      # standalone, e.g. for bench/
"""

import argparse
import asyncio
import hashlib
import re
import threading
import time
from collections import Counter

KINDS = ("429", "500", "503", "timeout", "malformed", "empty", "no_choices", "reset")


def fake_prompt_logprobs(ids: list[int], k: int, vocab: int = 1000) -> list:
    """vLLM's prompt_logprobs shape for a prompt of token ids: None, then per token i its top k ({id: {logprob, rank,
    decoded_token}}) — deterministic in the previous token — plus token i itself, ranked lower, when not among them."""
    out = [None]
    for prev, tok in zip(ids, ids[1:]):
        top = {str((prev * 7 + r) % vocab): {"logprob": -0.5 * (r + 1), "rank": r + 1, "decoded_token": "t"}
               for r in range(k)}
        top.setdefault(str(tok), {"logprob": -40.0, "rank": 500, "decoded_token": "t"})
        out.append(top)
    return out


def fake_logprobs(text: str, k: int, chat: bool, as_ids: bool, vocab: int = 1000) -> dict:
    """The logprobs of a generated text, word by word: each word first (logprob −0.1), then k − 1 others. Completions
    shape ({tokens, token_logprobs, top_logprobs: [{token: logprob}]}) or chat ({content: [{token, logprob,
    top_logprobs}]}); with `as_ids` (vLLM's return_tokens_as_token_ids) every token as 'token_id:N'."""
    words = re.findall(r"\s*\S+", text)
    word_id = lambda w: int(hashlib.sha256(w.encode()).hexdigest()[:6], 16) % vocab   # noqa: E731
    name = lambda i, w: f"token_id:{i}" if as_ids else w   # noqa: E731
    tops = [[(name(word_id(w), w), -0.1)] + [(name((word_id(w) + r) % vocab, f"{w}~{r}"), -1.0 - r) for r in range(1, k)]
            for w in words]
    tokens = [t[0][0] for t in tops]
    if chat:
        return {"content": [{"token": tok, "logprob": -0.1, "bytes": None,
                             "top_logprobs": [{"token": a, "logprob": v, "bytes": None} for a, v in top]}
                            for tok, top in zip(tokens, tops)]}
    return {"tokens": tokens, "token_logprobs": [-0.1] * len(tokens), "top_logprobs": [dict(top) for top in tops],
            "text_offset": []}


def tokenizer_logprobs(tokenizer, prompt: str, text: str, k: int) -> dict:
    """Completions logprobs as vLLM gives them for a model with `tokenizer`, tokens as 'token_id:N': the ids the
    prompt and text encode to after the prompt's own, then <eos> (a model that stopped), each first (−0.1), then k − 1
    other ids."""
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    ids = tokenizer(prompt + " " + text.strip(), add_special_tokens=False).input_ids[n:] + [tokenizer.eos_token_id]
    tops = [[(f"token_id:{t}", -0.1)] + [(f"token_id:{(t + r) % len(tokenizer)}", -1.0 - r) for r in range(1, k)]
            for t in ids]
    return {"tokens": [t[0][0] for t in tops], "token_logprobs": [-0.1] * len(ids), "top_logprobs": [dict(t) for t in tops],
            "text_offset": []}


class FakeOpenAI:
    def __init__(self, latency_s: float = 0.0, faults: dict[str, float] | None = None, fail_attempts: int = 1,
                 answers: dict[str, str] | None = None, timeout_sleep_s: float = 5.0, die_after: int | None = None,
                 prompt_logprobs: bool = True, max_logprobs: int = 20, logprobs: bool = True, tokenizer=None,
                 vocab: int = 1000):
        self.latency_s = latency_s
        self.faults = faults or {}
        self.fail_attempts = fail_attempts
        self.answers = answers or {}
        self.timeout_sleep_s = timeout_sleep_s
        self.die_after = die_after  # after this many successful responses every request gets 503 (endpoint down)
        self.prompt_logprobs = prompt_logprobs  # False: an OpenAI-compatible endpoint without vLLM's extension
        self.max_logprobs = max_logprobs        # vLLM's --max-logprobs: above it a request is refused (400)
        self.logprobs = logprobs                # False: an endpoint that answers without the logprobs asked
        self.tokenizer = tokenizer              # a model folder's tokenizer: completions logprobs as its token ids
        self.vocab = vocab                      # prompt_logprobs' token ids are below it (a model's vocabulary)
        self.attempts: Counter[str] = Counter()  # prompt -> requests received
        self.served: Counter[str] = Counter()  # prompt -> successful (200, well-formed) responses delivered: "paid"
        self.auth_headers: set[str] = set()
        self.requests = 0
        self._lock = threading.Lock()
        self.port: int | None = None
        self._server = None
        self._thread = None

    # -- behaviour ---------------------------------------------------------------------------------
    def fault_for(self, prompt: str) -> str | None:
        x = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        edge = 0.0
        for kind in KINDS:
            edge += self.faults.get(kind, 0.0)
            if x < edge:
                return kind
        return None

    def rationale(self, prompt: str) -> str:
        question = prompt.rsplit("Q: ", 1)[-1].split("\nA:")[0].strip()
        answer = self.answers.get(question)
        if answer is None:
            nums = re.findall(r"\d+", question)
            answer = nums[-1] if nums else "0"
        return f" Reading the question carefully, the result follows. Therefore, the answer is {answer}."

    def app(self):
        # plain Starlette (no FastAPI validation layer): the server's own cost per request stays small
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route

        async def health(request):
            return PlainTextResponse("ok")

        async def handle(request, chat: bool):
            body = await request.json()
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            ids = prompt if isinstance(prompt, list) else None      # token ids: a scoring request
            prompt = ",".join(map(str, ids)) if ids else prompt
            with self._lock:
                self.requests += 1
                self.attempts[prompt] += 1
                attempt = self.attempts[prompt]
                self.auth_headers.add(request.headers.get("authorization", ""))
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            kind = self.fault_for(prompt) if attempt <= self.fail_attempts else None
            if self.die_after is not None and sum(self.served.values()) >= self.die_after:
                kind = "503"
            if kind in ("429", "500", "503"):
                return JSONResponse({"error": {"message": f"injected {kind}"}}, status_code=int(kind),
                                    headers={"retry-after-ms": "10"} if kind == "429" else None)
            if kind == "timeout":
                await asyncio.sleep(self.timeout_sleep_s)
                if await request.is_disconnected():   # the client gave up: nothing was delivered, nothing paid
                    return PlainTextResponse("", status_code=499)
            if kind == "malformed":
                return PlainTextResponse("<html>upstream error</html>", status_code=200)
            if kind == "no_choices":
                return JSONResponse({"id": "x", "object": "text_completion", "choices": []})
            if kind == "reset":   # announces more body than it sends: the server closes the connection mid-body
                return Response(b'{"id": "x", "choi', status_code=200, media_type="application/json",
                                headers={"content-length": "4096"})
            sample_k = body.get("top_logprobs") if chat else body.get("logprobs")
            if isinstance(sample_k, int) and not isinstance(sample_k, bool) and sample_k > self.max_logprobs:
                return JSONResponse({"error": {"message": f"Requested sample logprobs of {sample_k}, which is greater "
                                               f"than max allowed: {self.max_logprobs}", "code": 400}}, status_code=400)
            asked = body.get("prompt_logprobs")
            if asked and asked > self.max_logprobs:   # vLLM's own wording
                return JSONResponse({"error": {"message": f"Requested prompt logprobs of {asked}, which is greater "
                                               f"than max allowed: {self.max_logprobs}", "code": 400}}, status_code=400)
            text = "" if kind == "empty" else (" 0" if ids else self.rationale(prompt))
            if kind != "empty":
                with self._lock:
                    self.served[prompt] += 1
            n_prompt, n_completion = len(prompt.split()), len(text.split())
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                      else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
            if ids and asked and self.prompt_logprobs:
                choice["prompt_logprobs"] = fake_prompt_logprobs(ids, asked, self.vocab)
            top_k = body.get("top_logprobs") if chat and body.get("logprobs") else None if chat else body.get("logprobs")
            if top_k and self.logprobs and text and self.tokenizer is not None and not chat:
                choice["logprobs"] = tokenizer_logprobs(self.tokenizer, prompt, text, top_k)
            elif top_k and self.logprobs and text:
                choice["logprobs"] = fake_logprobs(text, top_k, chat, bool(body.get("return_tokens_as_token_ids")))
            return JSONResponse({"id": f"cmpl-{self.requests}", "object": "chat.completion" if chat else "text_completion",
                                 "created": int(time.time()), "model": body.get("model", "fake"), "choices": [choice],
                                 "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                                           "total_tokens": n_prompt + n_completion}})

        async def completions(request):
            return await handle(request, chat=False)

        async def chat_completions(request):
            return await handle(request, chat=True)

        return Starlette(routes=[Route("/health", health), Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/chat/completions", chat_completions, methods=["POST"])])

    # -- lifecycle (in a background thread) -----------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        import uvicorn

        from tasks.teacher_backends import free_port

        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


async def serve_raw(port: int, latency_s: float) -> None:
    """Benchmark server: bare asyncio HTTP/1.1 with keep-alive, /v1/completions only, no faults. Its own cost per
    request is a fraction of a millisecond, so a client benchmark measures the client, not the server."""
    import json

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                if latency_s:
                    await asyncio.sleep(latency_s)
                n += 1
                text = " So the result follows. Therefore, the answer is 1."
                payload = json.dumps({"id": f"cmpl-{n}", "object": "text_completion", "created": 0,
                                      "model": body.get("model", "fake"),
                                      "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                                      "usage": {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--raw", action="store_true", help="bare asyncio server for client benchmarks")
    args = parser.parse_args()
    if args.raw:
        import uvloop

        uvloop.run(serve_raw(args.port, args.latency))
        return
    # uvloop + httptools keep the server's own per-request cost low (it shares 2 cores with the client)
    uvicorn.run(FakeOpenAI(latency_s=args.latency).app(), host="127.0.0.1", port=args.port, log_level="warning",
                loop="uvloop", http="httptools", access_log=False)


if __name__ == "__main__":
    main()
