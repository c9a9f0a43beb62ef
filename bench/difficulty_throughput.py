"""Step-difficulty scoring throughput: length-bucketed batches (keystep) vs a naive loop that pads every
sequence to the model's max length in dataset order, same token budget per batch, same model and data.
Goal: >= 1.5x real (non-padding) tokens/s. Both give the same NLLs (tests/tasks/test_difficulty.py).
--smoke: 64 problems and the micro student (seconds, for the test suite).
"""
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

from keystep.config import load_config  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import ingest, steps, student, teacher, token_weights  # noqa: E402
from tasks.difficulty import token_nll  # noqa: E402


def main() -> None:
    import torch

    max_len = 256
    smoke = {"data.train.n": 64, "student.hidden_size": 32, "student.num_layers": 1, "student.num_heads": 2,
             "student.intermediate_size": 64} if SMOKE else {}
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"data.train.max_steps": 5, "student.max_length": max_len, **smoke})
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        gen = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train))
        st = student.STUDENT.run(ws, cfg, student.StudentInputs(generation=gen))
        model, tok = student.load_student(st.model_dir)
        _, items = token_weights.load_encoded(ws, cfg, tok, gen, steps.STEPS.run(ws, cfg, steps.StepsInputs(
            generation=gen, student=st)))
        real = sum(len(it.ids) for it in items)
        torch.set_num_threads(2)
        token_nll(model, items[:64], 4096, "cpu")  # warm-up
        timings = {"bucketed": [], "naive": []}
        for _ in range(2):  # alternate, keep the best of each
            t0 = time.perf_counter()
            token_nll(model, items, 4096, "cpu")
            timings["bucketed"].append(real / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            token_nll(model, items, 4096, "cpu", bucketed=False, fixed_width=max_len)
            timings["naive"].append(real / (time.perf_counter() - t0))
    b, n = max(timings["bucketed"]), max(timings["naive"])
    print(json.dumps({"bench": "difficulty_throughput", "metric": "scored tokens/s (length-bucketed)", "value": round(b),
                      "baseline": round(n), "ratio": round(b / n, 3), "goal": "ratio >= 1.5 (baseline = fixed padding to max length)",
                      "met": b / n >= 1.5, "details": {"sequences": len(items), "real_tokens": real, "max_length": max_len,
                                                       "mean_length": round(real / len(items), 1), "batch_tokens": 4096,
                                                       "runs": {k: [round(x) for x in v] for k, v in timings.items()}}}))


if __name__ == "__main__":
    main()
