"""Teacher stage: one rationale per (example, sample index) from a teacher backend.

Input: an ingested dataset (fingerprint) and a `TeacherConfig`. Output: rows in `rationales`, keyed by
(teacher fingerprint, example id, sample index) — the teacher fingerprint depends on the teacher config
only, so a new dataset version reuses every rationale already stored and asks only for new items.
Bad teacher output is data: a failed item keeps its raw text and a reason and is counted, never a crash.

Backends implement `TeacherBackend.generate`. `reference` (the dataset's own rationales) is the offline
default; the vLLM / OpenAI-compatible backends fill the same interface.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from keystep.config import TeacherConfig
from storage.fingerprint import content_hash, fingerprint
from tasks.answers import extract_answer, is_correct

CODE_VERSION = "1"


@dataclass
class GenerationRequest:
    example_id: str
    sample_index: int
    prompt: str
    question: str
    answer: str
    answer_type: str
    reference_rationale: str | None = None


@dataclass
class GenerationResult:
    text: str | None
    status: str = "ok"  # ok | failed
    reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0
    finish_reason: str | None = None


class TeacherBackend(Protocol):
    """Turns prompts into rationales. Must return one result per request, in order; I/O errors are retried
    inside the backend, malformed output is returned as a failed result with a reason."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...


class ReferenceTeacher:
    """The dataset's own rationales, followed by the answer sentence (offline default)."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for req in requests:
            t0 = time.perf_counter()
            if not req.reference_rationale:
                out.append(GenerationResult(text=None, status="failed", reason="no reference rationale in dataset"))
                continue
            text = f"{req.reference_rationale.strip()} {self.cfg.answer_template.format(answer=req.answer)}"
            out.append(GenerationResult(text=text, latency_s=time.perf_counter() - t0, finish_reason="stop",
                                        usage={"prompt_tokens": 0, "completion_tokens": 0}))
        return out


def make_backend(cfg: TeacherConfig) -> TeacherBackend:
    if cfg.backend == "reference":
        return ReferenceTeacher(cfg)
    raise ValueError(f"config key 'teacher.backend': unknown backend {cfg.backend!r}")


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    return fingerprint("teacher", cfg, code_version=CODE_VERSION)


def rationale_id(teacher_fp: str, example_id: str, sample_index: int) -> str:
    return content_hash(f"{teacher_fp}|{example_id}|{sample_index}")


def format_prompt(cfg: TeacherConfig, question: str) -> str:
    return cfg.prompt_template.format(question=question)


def training_target(text: str, answer: str, cfg: TeacherConfig) -> str:
    """The student's target: the rationale ending with the answer sentence (appended if the teacher left it out)."""
    phrase = cfg.answer_template.format(answer=answer)
    text = text.strip()
    return text if text.endswith(phrase) else f"{text} {phrase}"


def generate_rationales(catalog, cfg: TeacherConfig, dataset_fp: str, fp: str, backend: TeacherBackend | None = None,
                        batch_size: int = 256) -> dict:
    """Generate what is missing for (teacher fp, example, sample) and commit per batch, so a killed run keeps
    every finished batch and a rerun asks only for the rest."""
    done = catalog.stage_output(fp)
    if done:
        return done["summary"]
    backend = backend or make_backend(cfg)
    t_fp = teacher_fingerprint(cfg)
    examples = catalog.query("examples_of_dataset", dataset_fp=dataset_fp)
    have = {r["rationale_id"] for r in catalog.execute(
        "select rationale_id from rationales where teacher_fp = ?", [t_fp])}
    todo = [GenerationRequest(example_id=ex["example_id"], sample_index=s, prompt=format_prompt(cfg, ex["question"]),
                              question=ex["question"], answer=ex["answer"], answer_type=ex["answer_type"],
                              reference_rationale=ex["reference_rationale"])
            for ex in examples for s in range(cfg.n_samples)
            if rationale_id(t_fp, ex["example_id"], s) not in have]
    params = json.dumps({"backend": cfg.backend, "n_samples": cfg.n_samples})
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        results = backend.generate(batch)
        rows = []
        for req, res in zip(batch, results, strict=True):
            extracted = extract_answer(res.text, req.answer_type) if res.status == "ok" else None
            if res.status == "ok" and not (res.text or "").strip():
                res.status, res.reason = "failed", "empty response"
            rows.append({"rationale_id": rationale_id(t_fp, req.example_id, req.sample_index), "teacher_fp": t_fp,
                         "example_id": req.example_id, "sample_index": req.sample_index, "prompt": req.prompt,
                         "text": res.text, "params_json": params, "usage_json": json.dumps(res.usage),
                         "latency_s": res.latency_s, "finish_reason": res.finish_reason,
                         "extracted_answer": extracted,
                         "correct": res.status == "ok" and is_correct(extracted, req.answer, req.answer_type),
                         "status": res.status, "reason": res.reason})
        with catalog.transaction() as con:
            catalog.insert(con, "rationales", rows)
    counts = catalog.query("teacher_summary", teacher_fp=t_fp)[0]
    scoped = catalog.execute(
        "select count(*) as n, count(*) filter (where r.status = 'ok') as n_ok, "
        "count(*) filter (where r.correct) as n_correct, "
        "list(distinct r.reason) filter (where r.reason is not null) as reasons "
        "from rationales r join examples e on e.example_id = r.example_id and e.dataset_fp = ? "
        "where r.teacher_fp = ?", [dataset_fp, t_fp])[0]
    summary = {"teacher_fp": t_fp, "dataset_fp": dataset_fp, "n_requested": len(todo), "n": scoped["n"],
               "n_ok": scoped["n_ok"], "n_failed": scoped["n"] - scoped["n_ok"], "n_correct": scoped["n_correct"],
               "correct_rate": scoped["n_correct"] / scoped["n"] if scoped["n"] else 0.0,
               "failure_reasons": scoped["reasons"] or [], "teacher_total_rows": counts["n"]}
    with catalog.transaction() as con:
        catalog.record_stage(con, fp, stage="teacher", code_version=CODE_VERSION, config=cfg,
                             upstream=[dataset_fp, t_fp], summary=summary)
    return summary


# ---- Prefect wrapper ------------------------------------------------------------------------------
from prefect import get_run_logger  # noqa: E402

from storage.workspace import Workspace  # noqa: E402
from tasks.prefect_stage import stage_task  # noqa: E402


def generation_fingerprint(cfg: TeacherConfig, dataset_fp: str) -> str:
    return fingerprint("generate", cfg, [dataset_fp, teacher_fingerprint(cfg)], CODE_VERSION)


@stage_task("teacher-rationales")
def generate_task(workspace: str, cfg: TeacherConfig, dataset_fp: str, fp: str) -> dict:
    summary = generate_rationales(Workspace(workspace).catalog(), cfg, dataset_fp, fp)
    get_run_logger().info("teacher %s: %d rationales, %d failed, correct rate %.1f%%", cfg.backend, summary["n"],
                          summary["n_failed"], 100 * summary["correct_rate"])
    return {**summary, "fingerprint": fp}
