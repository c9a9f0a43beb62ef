"""Teacher client throughput: keystep's openai backend against a local OpenAI-protocol server that answers
every request after 50 ms. Ideal = concurrency / latency requests/s; goal: achieved >= 0.90 x ideal.

Measured at concurrency 4, 8 and 16, each beside a bare httpx client (no retries, no parsing) on the same
server, because on a 2-core machine client and server together saturate near 300 requests/s: at 16 in
flight (ideal 320/s) even the bare client cannot reach 0.9. The headline figure is concurrency 8.

The server runs in its own process (python -m tests.fake_openai --raw: bare asyncio HTTP, a fraction of a
millisecond per request) so it neither shares the client's GIL nor adds its own overhead to the measurement.
Details also give the whole teacher stage (plan, shards, Parquet spool, catalog ingest) for the same work.
--smoke: 64 requests at concurrency 8 only (seconds, for the test suite).
"""
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import DistillConfig, OpenAITeacherConfig, StorageConfig, SyntheticDatasetSpec  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks.ingest import ingest  # noqa: E402
from tasks.teacher import generate_rationales  # noqa: E402
from tasks.teacher_backends import GenerationRequest, OpenAITeacher, free_port  # noqa: E402

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")
LATENCY, CONCURRENCY, N = 0.05, 8, 64 if SMOKE else 2000
SWEEP = (8,) if SMOKE else (4, 8, 16)


async def bare_client(base_url: str, concurrency: int) -> float:
    """Baseline: the leanest asyncio client, same server, same concurrency."""
    import httpx

    pending = list(range(N))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            while pending:
                i = pending.pop()
                r = await client.post(f"{base_url}/completions", json={"model": "fake", "prompt": f"Q: {i}\nA:"})
                r.json()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return N / (time.perf_counter() - t0)


def main() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--port", str(port), "--latency", str(LATENCY), "--raw"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        base_url = f"http://127.0.0.1:{port}/v1"
        requests = [GenerationRequest(example_id=str(i), sample_index=0, prompt=f"Q: What is {i} + 1?\nA:",
                                      question="", answer="", answer_type="number") for i in range(N)]
        sweep = {}
        for c in SWEEP:
            backend = OpenAITeacher(OpenAITeacherConfig(backend="openai", base_url=base_url, model="fake", concurrency=c,
                                                  timeout_s=30), api_key=None)
            list(backend.generate(requests[:64]))  # warm-up: connections, imports
            t0 = time.perf_counter()
            got = sum(1 for _ in backend.generate(requests))
            assert got == N
            keystep_rps = N / (time.perf_counter() - t0)
            bare_rps = asyncio.run(bare_client(base_url, c))
            sweep[c] = {"ideal": c / LATENCY, "keystep_rps": round(keystep_rps, 1), "bare_httpx_rps": round(bare_rps, 1),
                        "keystep_vs_ideal": round(keystep_rps * LATENCY / c, 3),
                        "bare_vs_ideal": round(bare_rps * LATENCY / c, 3)}
        cfg = OpenAITeacherConfig(backend="openai", base_url=base_url, model="fake", concurrency=CONCURRENCY, timeout_s=30,
                            commit_every=256)
        with tempfile.TemporaryDirectory() as tmp:
            ws = Workspace(tmp)
            dataset = ingest(ws, SyntheticDatasetSpec(n=N, seed=7))
            t0 = time.perf_counter()
            stage = generate_rationales(ws, DistillConfig(teacher=cfg, storage=StorageConfig(workspace=tmp)), dataset)
            stage_s = time.perf_counter() - t0
    finally:
        server.terminate()
    assert stage.n == N
    ideal = CONCURRENCY / LATENCY
    achieved = sweep[CONCURRENCY]["keystep_rps"]
    print(json.dumps({"bench": "teacher_client", "metric": "requests/s through the openai backend",
                      "value": round(achieved, 1), "baseline": ideal, "ratio": round(achieved / ideal, 3),
                      "goal": "ratio >= 0.90 (baseline = concurrency / latency)", "met": achieved / ideal >= 0.90,
                      "details": {"requests": N, "concurrency": CONCURRENCY, "latency_s": LATENCY, "sweep": sweep,
                                  "whole_stage_requests_per_s": round(N / stage_s, 1),
                                  "whole_stage_ratio": round(N / stage_s / ideal, 3)}}))


if __name__ == "__main__":
    main()
