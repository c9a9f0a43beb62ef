"""What an on-policy epoch costs (issue 31): one epoch of `train.loss: on_policy` (λ = 1: every step on the student's
own samples, the upper bound; λ = 0.5 costs about half the sampling and scoring) split into sampling (HF generate
in the training process), teacher scoring and the update, against one Std-CoT epoch on the same kept rationales,
student and machine. Beside it (details): the teacher's scoring throughput in positions/s by the local forward
engine, timed on the epoch's own samples, and — when .venv-vllm exists (`make test-vllm`) and not --smoke — by a
vLLM server's prompt_logprobs on the same sequences.

The teacher is a random Llama with the student's tokenizer, twice as wide and as deep as the student (about 4x its
parameters, as R3's teacher is): scoring cost does not depend on what it learned.

Usage: python bench/on_policy.py [N]       (N training problems; default 512, configs/demo.yaml's student)
       python bench/on_policy.py --smoke   (configs/micro.yaml on 16 problems: seconds, for the test suite)
"""
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import load_config  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import ingest, teacher  # noqa: E402
from tasks.student import STUDENT, StudentInputs, load_student  # noqa: E402
from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs, top_k_scores  # noqa: E402
from tasks.train import TRAIN, TrainInputs  # noqa: E402

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
N = 16 if SMOKE else int(next((a for a in sys.argv[1:] if a.isdigit()), 512))
K = 20


def wider_teacher(student_dir: str, out: Path) -> str:
    """A random Llama with the student's tokenizer, 2x its width and depth."""
    from transformers import AutoConfig, LlamaForCausalLM

    _, tok = load_student(student_dir)
    c = AutoConfig.from_pretrained(student_dir)
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = 2 * c.hidden_size, 2 * c.intermediate_size, 2 * c.num_hidden_layers
    c.head_dim = c.hidden_size // c.num_attention_heads
    LlamaForCausalLM(c).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def vllm_positions_per_s(teacher_dir: str, seqs: list[list[int]], tmp: Path) -> float | None:
    """Positions/s of vLLM prompt_logprobs on the same sequences (None without .venv-vllm)."""
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if SMOKE or not python.exists():
        return None
    from keystep.config import TeacherScoresConfig
    from tasks.teacher_backends import vllm_server
    from tasks.teacher_scores import vllm_top_k_scores

    cfg = TeacherScoresConfig(model=teacher_dir, k=K, engine="vllm", concurrency=16)
    args = ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-logprobs", str(K)]
    with vllm_server(str(python), teacher_dir, tmp / "vllm.log", "teacher", 0, args, 600, "bench") as url:
        vllm_top_k_scores(cfg, url, "teacher", seqs[:4])     # warm-up
        t0 = time.perf_counter()
        vllm_top_k_scores(cfg, url, "teacher", seqs)
        return sum(len(s) - 1 for s in seqs) / (time.perf_counter() - t0)


def main() -> None:
    import numpy as np
    import pyarrow.parquet as pq

    preset = "micro.yaml" if SMOKE else "demo.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        cfg = load_config(ROOT / "configs" / preset, {"storage.workspace": str(ws.root), "data.train.n": N,
                                                     "train.epochs": 1, "train.device": "cpu"})
        dataset = ingest.ingest(ws, cfg.data.train)
        gen = teacher.generate_rationales(ws, cfg, dataset)
        st = STUDENT.run(ws, cfg, StudentInputs(generation=gen))
        teacher_dir = wider_teacher(st.model_dir, Path(tmp) / "teacher")
        op = load_config(ROOT / "configs" / preset, {**cfg.model_dump(mode="json"), "train.loss": "on_policy",
                                                    "train.on_policy.lmbda": 1.0, "teacher_scores.model": teacher_dir,
                                                    "teacher_scores.k": K})
        scores = TEACHER_SCORES.run(ws, op, TeacherScoresInputs(generation=gen, student=st))
        t0 = time.perf_counter()
        std = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
        std_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        on = TRAIN.run(ws, op, TrainInputs(generation=gen, student=st, teacher_scores=scores))
        on_s = time.perf_counter() - t0
        (epoch,) = on.history
        part = ws.catalog().execute("select part from on_policy_samples where train_fp = ?", [on.fp])[0]["part"]
        seqs = [np.frombuffer(r["ids"], np.int32).tolist() for r in pq.read_table(ws.root / part).to_pylist()]
        positions = sum(len(s) - 1 for s in seqs)
        model, _ = load_student(teacher_dir, device="cpu")
        top_k_scores(model, seqs[:4], K, 8192, "cpu")        # warm-up
        t0 = time.perf_counter()
        top_k_scores(model, seqs, K, 8192, "cpu")
        local = positions / (time.perf_counter() - t0)
        served = vllm_positions_per_s(teacher_dir, seqs, Path(tmp))
    print(json.dumps({
        "bench": "on_policy", "metric": "seconds of one on-policy epoch (λ = 1: every step samples and is scored)",
        "value": round(on_s, 2), "baseline": round(std_s, 2), "ratio": round(on_s / std_s, 2),
        "goal": "none set: the cost to report (baseline = one Std-CoT epoch on the same rationales, student, machine)",
        "met": True,
        "details": {"problems": N, "student": preset, "sampling_s": epoch["sample_s"], "scoring_s": epoch["score_s"],
                    "update_s": epoch["update_s"], "samples": epoch["samples"],
                    "sample_accuracy": epoch["sample_accuracy"], "std_cot_epoch_s": round(std_s, 2),
                    "std_cot_loss": round(std.history[0]["loss"], 4),
                    "teacher_local_positions_per_s": round(local, 1),
                    "teacher_vllm_prompt_logprobs_positions_per_s": round(served, 1) if served else
                    "not run (--smoke or no .venv-vllm)", "k": K}}))


if __name__ == "__main__":
    main()
