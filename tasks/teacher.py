"""Teacher stage: one rationale per (example, sample index) from a teacher backend.

Input: an ingested dataset (fingerprint) and a `TeacherConfig`. Output: rows in `rationales`, keyed by
(teacher fingerprint, example id, sample index). The teacher fingerprint covers only what changes the
generated text (model, prompt, sampling), so a new dataset version reuses every stored rationale and asks
only for new items, and retuning concurrency or timeouts never re-pays.

Work is split in three so that it scales out and never pays twice:
  plan    (flow process) ingest leftover spool files, list the missing items, write request shards;
  shard   (any worker)   call the backend, write finished results to Parquet part files every
                         `commit_every` results (temp name, then rename) — workers never open the catalog;
  finish  (flow process) ingest the part files into the catalog in one transaction, record the stage.
A killed run leaves finished parts in the spool; the next plan ingests them first and asks only for the rest.
Bad teacher output is data: failed rows keep the raw text and a reason.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pydantic import BaseModel

from keystep.config import DistillConfig, TeacherConfig
from storage.fingerprint import Lineage, content_hash, fingerprint
from storage.workspace import Workspace, write_atomic
from tasks.answers import extract_answer, is_correct
from tasks.formats import format_prompt
from tasks.ingest import Dataset
from tasks.stage import Stage, StageInputs, StageOutput
from tasks.teacher_backends import (PROTOCOL_FAULTS, GenerationRequest, GenerationResult, TeacherUnavailable,
                                    make_backend, open_endpoint, resolve_api_key)
from tasks.teacher_logprobs import captured_summary, spool_columns, store_captured

CODE_VERSION = "2"


def teacher_identity(cfg: TeacherConfig) -> dict:
    """What makes the teacher's text what it is: its settings less how requests are sent (the `operational` fields), with
    a batch counted as the endpoint its lines call — so online and batch requests are the same items, and configs
    from before batches existed keep their fingerprint."""
    what = cfg.fingerprinted(exclude={"batch_endpoint"})
    what["api"] = cfg.request_api
    return what


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    what = teacher_identity(cfg)
    what.pop("keep_only_correct")
    return fingerprint("teacher", what, code_version=CODE_VERSION)


class Generation(StageOutput):
    """Teacher rationales for a dataset: rows of `rationales` under (dataset_fp, teacher_fp)."""
    dataset_fp: str
    teacher_fp: str
    n: int
    n_ok: int
    n_failed: int
    n_correct: int
    correct_rate: float
    failure_reasons: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    mean_latency_s: float
    wall_s: float | None = None
    completion_tokens_per_s: float | None = None
    cost_estimate: float | None = None
    logprob_tokens: int = 0                      # teacher.logprobs: generated tokens with their top-k kept
    logprob_bytes_per_token: float | None = None


class GenerationPlan(BaseModel):
    """The items still to generate, as request shards (Parquet) for the shard workers."""
    teacher_fp: str
    n_todo: int
    shards: list[str]
    recovered: int


class GenerateInputs(StageInputs):
    """The ingested dataset the teacher answers."""
    dataset: Dataset


def generation_lineage(config: DistillConfig, inputs: GenerateInputs) -> Lineage:
    """What changes the generated text (and keep_only_correct, which changes what is kept); not how requests are sent."""
    return Lineage("generate", teacher_identity(config.teacher), (inputs.dataset.fp,), CODE_VERSION)


def rationale_id(teacher_fp: str, example_id: str, sample_index: int) -> str:
    return content_hash(f"{teacher_fp}|{example_id}|{sample_index}")


def chat_messages(cfg: TeacherConfig, question: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for d in cfg.few_shot:
        msgs += [{"role": "user", "content": cfg.prompt_template.format(question=d.question)},
                 {"role": "assistant", "content": f"{d.rationale} {cfg.answer_template.format(answer=d.answer)}"}]
    return msgs + [{"role": "user", "content": cfg.prompt_template.format(question=question)}]


def spool_dir(catalog, cfg: TeacherConfig) -> Path:
    return catalog.path.parent / "spool" / teacher_fingerprint(cfg)


def ingest_spool(catalog, spool: Path) -> int:
    """Move finished result parts into the catalog (skipping ids already there), then delete them."""
    parts = sorted(spool.glob("results-*.parquet")) if spool.exists() else []
    if not parts:
        return 0
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    stored = {r["rationale_id"]: r["status"] for r in catalog.query("rationale_status", ids=[r["rationale_id"] for r in rows])}
    # a new attempt replaces a stored failed one (a retried item); a stored success is never replaced
    fresh = {r["rationale_id"]: r for r in rows if stored.get(r["rationale_id"]) in (None, "failed")}
    retried = [rid for rid in fresh if rid in stored]
    with catalog.transaction() as con:
        if retried:
            con.execute("delete from rationales where rationale_id in (select unnest(?))", [retried])
        # teacher.logprobs: the captured columns go to their own Parquet part, committed with their rationales
        store_captured(con, catalog, catalog.path.parent, spool.name, list(fresh.values()))
        catalog.insert(con, "rationales", list(fresh.values()))
    for p in parts:
        p.unlink()
    return len(fresh)


def plan_generation(catalog, cfg: TeacherConfig, dataset_fp: str, shards: int | None = None) -> GenerationPlan:
    """Request shards for every (example, sample) not yet stored for this teacher."""
    spool = spool_dir(catalog, cfg)
    recovered = ingest_spool(catalog, spool)
    t_fp = teacher_fingerprint(cfg)
    have = {r["rationale_id"] for r in catalog.query("rationales_to_keep", teacher_fp=t_fp,
                                                      retry_failed=cfg.retries_failed)}
    todo = []
    for ex in catalog.query("examples_of_dataset", dataset_fp=dataset_fp):
        for s in range(cfg.n_samples):
            rid = rationale_id(t_fp, ex["example_id"], s)
            if rid not in have:
                todo.append({"rationale_id": rid, "example_id": ex["example_id"], "sample_index": s,
                             "question": ex["question"], "answer": ex["answer"], "answer_type": ex["answer_type"],
                             "reference_rationale": ex["reference_rationale"]})
    spool.mkdir(parents=True, exist_ok=True)
    for old in spool.glob("requests-*.parquet"):
        old.unlink()
    n = max(1, min(shards or cfg.shards, len(todo))) if todo else 0
    paths = []
    for k in range(n):
        path = spool / f"requests-{k:04d}.parquet"
        write_atomic(path, pa.Table.from_pylist(todo[k::n]))
        paths.append(str(path))
    return GenerationPlan(teacher_fp=t_fp, n_todo=len(todo), shards=paths, recovered=recovered)


def result_row(cfg: TeacherConfig, t_fp: str, req: GenerationRequest, res: GenerationResult) -> dict:
    if res.status == "ok" and not (res.text or "").strip():
        res.status, res.reason = "failed", "empty response"
    extracted = extract_answer(res.text, req.answer_type) if res.status == "ok" else None
    params = {k: cfg.setting(k) for k in ("backend", "model", "api", "temperature", "top_p", "max_tokens", "stop", "seed")}
    return {"rationale_id": rationale_id(t_fp, req.example_id, req.sample_index), "teacher_fp": t_fp,
            "example_id": req.example_id, "sample_index": req.sample_index, "prompt": req.prompt, "text": res.text,
            "params_json": json.dumps(params), "usage_json": json.dumps(res.usage), "latency_s": res.latency_s,
            "finish_reason": res.finish_reason, "extracted_answer": extracted,
            "correct": res.status == "ok" and is_correct(extracted, req.answer, req.answer_type),
            "status": res.status, "reason": res.reason,
            **(spool_columns(res.logprobs, cfg.setting("logprobs")) if cfg.setting("logprobs") else {})}


def run_shard(cfg: TeacherConfig, requests_path: str, endpoint: str | None, backend=None,
              on_progress: Callable[[int, int], None] | None = None) -> int:
    """Generate one shard; results go to part files next to it, `commit_every` at a time."""
    req_path = Path(requests_path)
    if not req_path.exists():
        return 0
    spool, stem = req_path.parent, req_path.stem.replace("requests", "results")
    done_ids = {r for p in spool.glob(f"{stem}-*.parquet") for r in pq.read_table(p, columns=["rationale_id"]).column(0).to_pylist()}
    t_fp = teacher_fingerprint(cfg)
    requests = [GenerationRequest(example_id=r["example_id"], sample_index=r["sample_index"],
                                  prompt=format_prompt(cfg, r["question"]),
                                  messages=chat_messages(cfg, r["question"]) if cfg.request_api == "chat" else None,
                                  question=r["question"], answer=r["answer"], answer_type=r["answer_type"],
                                  reference_rationale=r["reference_rationale"])
                for r in pq.read_table(req_path).to_pylist() if r["rationale_id"] not in done_ids]
    backend = backend or make_backend(cfg, endpoint)
    part = len(list(spool.glob(f"{stem}-*.parquet")))
    buffer: list[dict] = []
    finished = 0

    def flush() -> None:
        nonlocal part, buffer
        if buffer:
            write_atomic(spool / f"{stem}-{part:05d}.parquet", pa.Table.from_pylist(buffer))   # whole or absent
            part, buffer = part + 1, []

    try:
        for req, res in backend.generate(requests):
            buffer.append(result_row(cfg, t_fp, req, res))
            finished += 1
            if len(buffer) >= cfg.commit_every:
                flush()
                if on_progress:
                    on_progress(finished, len(requests))
    finally:
        flush()  # keep whatever finished, also when the endpoint gave up
    req_path.unlink()
    return finished


def batch_backend(catalog, cfg: TeacherConfig, on_progress: Callable[[dict], None] | None = None):
    """`teacher.api: batch`: the Batch API (backend openai) or vLLM's run_batch (backend vllm), with the catalog's
    ledger of batches (tasks/teacher_batch.py); only the flow process runs it, since the ledger is in the catalog."""
    from tasks.teacher_batch import BatchTeacher, Ledger

    t_fp, runner = teacher_fingerprint(cfg), "vllm" if cfg.backend == "vllm" else "openai"
    return BatchTeacher(cfg, Ledger(catalog, t_fp, runner, cfg.base_url if runner == "openai" else None),
                        spool_dir(catalog, cfg) / "batches", "teacher" if runner == "vllm" else cfg.model,
                        custom_id=lambda req: rationale_id(t_fp, req.example_id, req.sample_index),
                        api_key=resolve_api_key(cfg) if runner == "openai" else None,
                        base_url=cfg.base_url if runner == "openai" else None, on_progress=on_progress)


def run_batches(catalog, cfg: TeacherConfig, shards: list[str], on_progress: Callable[[dict], None] | None = None) -> int:
    """Every planned shard through one batch backend (its batches split by the API's limits, not by shard)."""
    backend = batch_backend(catalog, cfg, on_progress)
    return sum(run_shard(cfg, path, None, backend=backend) for path in shards)


def retryable_failures(config: DistillConfig, done: Generation | None) -> bool:
    """Whether a finished generation has items whose last attempt hit a protocol fault, for a rerun to ask again."""
    return bool(done and done.n_failed and config.teacher.retries_failed
                and any(r.startswith(PROTOCOL_FAULTS) for r in done.failure_reasons))


def finish_generation(ws: Workspace, config: DistillConfig, inputs: GenerateInputs, lineage: Lineage,
                      wall_s: float | None = None) -> Generation:
    """The stage's body, after plan and shards: the spool into the catalog, then the counts. A generation with items
    to ask again is not `still_valid`, so a rerun recounts it (its output changes, its fingerprint not)."""
    catalog, cfg, dataset = ws.catalog(), config.teacher, inputs.dataset
    spool = spool_dir(catalog, cfg)
    ingest_spool(catalog, spool)
    leftover = list(spool.glob("requests-*.parquet")) if spool.exists() else []
    if leftover:
        raise TeacherUnavailable(f"{len(leftover)} teacher shard(s) did not finish; rerun to continue (finished work is kept)")
    t_fp = teacher_fingerprint(cfg)
    s = catalog.query("generation_summary", dataset_fp=dataset.fp, teacher_fp=t_fp)[0]
    per_reason = {r["reason"]: r["n"] for r in catalog.query("generation_failures", dataset_fp=dataset.fp, teacher_fp=t_fp)}
    n = s["n"] or 0
    cost = None
    prompt_price, completion_price = cfg.prices
    if prompt_price is not None or completion_price is not None:
        cost = ((s["prompt_tokens"] or 0) * (prompt_price or 0)
                + (s["completion_tokens"] or 0) * (completion_price or 0)) / 1000
    return Generation(fp=lineage.fp, teacher_fp=t_fp, dataset_fp=dataset.fp, n=n, n_ok=s["n_ok"] or 0,
                      n_failed=n - (s["n_ok"] or 0), n_correct=s["n_correct"] or 0,
                      correct_rate=s["n_correct"] / n if n else 0.0, failure_reasons=per_reason,
                      prompt_tokens=s["prompt_tokens"] or 0, completion_tokens=s["completion_tokens"] or 0,
                      mean_latency_s=s["mean_latency_s"] or 0.0, wall_s=wall_s or None,
                      completion_tokens_per_s=(s["completion_tokens"] or 0) / wall_s if wall_s else None,
                      cost_estimate=cost, **captured_summary(catalog, catalog.path.parent, t_fp))


GENERATE = Stage("generate", GenerateInputs, Generation, generation_lineage, finish_generation,
                 still_valid=lambda config, done: not retryable_failures(config, done))


def generate_rationales(ws: Workspace, config: DistillConfig, dataset: Dataset, backend=None,
                        endpoint: str | None = None) -> Generation:
    """plan -> shards -> finish in this process (what the generate flow does, without Prefect)."""
    inputs = GenerateInputs(dataset=dataset)
    lineage = generation_lineage(config, inputs)
    if done := GENERATE.cached(ws, config, lineage):
        return done
    t0 = time.perf_counter()
    plan = plan_generation(ws.catalog(), config.teacher, dataset.fp)
    if config.teacher.batched and backend is None:
        run_batches(ws.catalog(), config.teacher, plan.shards)
    else:
        for path in plan.shards:
            run_shard(config.teacher, path, endpoint, backend=backend)
    return GENERATE.run(ws, config, inputs, lineage, wall_s=time.perf_counter() - t0)


def usage_table(cfg: TeacherConfig, out: Generation) -> list[dict]:
    """The teacher-usage artifact's row, what a person reads first first: counts, tokens, throughput, cost, rounded;
    the fingerprints last."""
    batch = "_batch" if cfg.batched else ""
    cost = (f"{out.cost_estimate:.2f}" + (" (batch price)" if batch else "") if out.cost_estimate is not None else
            "no tokens billed" if cfg.backend == "reference" else f"unpriced: set teacher.cost_per_1k_*_tokens{batch}")
    return [{"teacher": cfg.backend if cfg.backend == "reference" else f"{cfg.backend}: {cfg.model}",
             "rationales": out.n, "failed": out.n_failed, "correct": f"{out.correct_rate:.1%}",
             "prompt tokens": out.prompt_tokens, "completion tokens": out.completion_tokens,
             "tokens/s": round(out.completion_tokens_per_s) if out.completion_tokens_per_s else "",
             "cost": cost, "mean latency s": round(out.mean_latency_s, 2), "wall s": round(out.wall_s, 1) if out.wall_s else "",
             "failures": ", ".join(f"{k}: {v}" for k, v in out.failure_reasons.items()) or "none",
             **({"top-k logprobs": f"k={cfg.setting('logprobs')}: {out.logprob_tokens} tokens, "
                                   f"{out.logprob_bytes_per_token or 0:.0f} B/token"} if cfg.setting("logprobs") else {}),
             "teacher fp": out.teacher_fp, "dataset fp": out.dataset_fp}]


def usage_description(cfg: TeacherConfig, out: Generation) -> str:
    if cfg.backend == "reference":
        return (f"Reference teacher: the dataset's own rationales, no tokens billed ({out.n} rationales, "
                f"{out.correct_rate:.1%} correct)")
    return f"Teacher {cfg.setting('model') or cfg.backend}: requests, tokens, throughput and cost of generation {out.fp}"


# ---- Prefect wrappers -----------------------------------------------------------------------------
from tasks.stage import prefect_task, workspace_of  # noqa: E402


@prefect_task(name="teacher-plan")
def plan_task(config: DistillConfig, dataset: Dataset) -> GenerationPlan:
    from prefect import get_run_logger

    plan = plan_generation(workspace_of(config).catalog(), config.teacher, dataset.fp)
    get_run_logger().info("teacher %s: %d items to generate in %d shard(s); %d recovered from an earlier run",
                          config.teacher.backend, plan.n_todo, len(plan.shards), plan.recovered)
    return plan


@prefect_task(name="teacher-batches")
def batch_task(config: DistillConfig, shards: list[str]) -> int:
    """`teacher.api: batch`, in the flow process (the batch ledger is in the catalog): submit, poll — with a progress
    artifact of the server's request counts — download and store, resuming any batch a killed run left."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress = create_progress_artifact(0.0, key="teacher-batches", description="teacher batches: requests done")
    logger, seen = get_run_logger(), {}

    def on_progress(state: dict) -> None:
        seen[state["batch"]] = state
        total = sum(s.get("total") or 0 for s in seen.values())
        done = sum((s.get("completed") or 0) + (s.get("failed") or 0) for s in seen.values())
        update_progress_artifact(progress, 100.0 * done / total if total else 0.0)
        logger.info("batch %s: %s, %s of %s requests done", state["batch"], state["status"], done, total)

    finished = run_batches(workspace_of(config).catalog(), config.teacher, shards, on_progress)
    update_progress_artifact(progress, 100.0)
    return finished


@prefect_task(name="teacher-shard")
def shard_task(cfg: TeacherConfig, requests_path: str, endpoint: str | None) -> int:
    """Runs on any worker (thread, Dask or Ray): talks to the teacher, writes Parquet parts, never the catalog."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress = create_progress_artifact(0.0, description=f"teacher shard {Path(requests_path).stem}")
    finished = run_shard(cfg, requests_path, endpoint,
                         on_progress=lambda done, total: update_progress_artifact(progress, 100.0 * done / max(total, 1)))
    update_progress_artifact(progress, 100.0)   # progress is reported per commit; the shard's end is 100%
    return finished


@GENERATE.in_prefect
def _finish_in_prefect(run, config: DistillConfig, inputs: GenerateInputs, lineage: Lineage) -> Generation:
    from prefect import get_run_logger
    from prefect.artifacts import create_table_artifact

    out = run()
    get_run_logger().info("teacher %s: %d rationales, %d failed %s, correct rate %.1f%%", config.teacher.backend, out.n,
                          out.n_failed, out.failure_reasons or "", 100 * out.correct_rate)
    create_table_artifact(key="teacher-usage", description=usage_description(config.teacher, out),
                          table=usage_table(config.teacher, out))
    return out


def teacher_rationales(config: DistillConfig, dataset: Dataset) -> Generation:
    """The teacher stage in a flow: plan (here) -> shards (mapped over the flow's task runner: threads, Dask or Ray)
    or batches (here: their ledger is in the catalog) -> finish (here, cached by the generation's fingerprint)."""
    from prefect import unmapped

    ws, inputs = workspace_of(config), GenerateInputs(dataset=dataset)
    if GENERATE.cached(ws, config, generation_lineage(config, inputs)):   # done: only the cached finish runs
        return GENERATE(config, inputs)
    t0 = time.perf_counter()
    plan = plan_task(config, dataset)
    if plan.shards and config.teacher.batched:
        batch_task(config, plan.shards)
    elif plan.shards:
        with open_endpoint(config.teacher, ws.root / "logs" / f"vllm-{plan.teacher_fp}.log") as endpoint:
            futures = shard_task.map(unmapped(config.teacher), plan.shards, unmapped(endpoint))
            futures.wait()
            failed = [f for f in futures if f.state.is_failed()]
            if failed:
                failed[0].result()  # re-raise the first shard's error (finished parts stay in the spool)
    # a rerun that asked again for failed items counts them anew under the same fingerprint (GENERATE's still_valid)
    return GENERATE(config, inputs, wall_s=time.perf_counter() - t0)
