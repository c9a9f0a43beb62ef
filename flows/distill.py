"""The `distill` flow and its phases: generate -> prepare -> train -> evaluate.

Flows only compose stage tasks, one line a stage; each task is cached by its stage's fingerprint and returns the
stage's typed output, which the next stages take as arguments. Each phase is a flow of its own (and a deployment);
given no upstream outputs it runs the phases before it, whose tasks are cache hits, so running `train` alone after
`generate` recomputes nothing upstream.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger, unmapped
from prefect.context import get_run_context
from pydantic import BaseModel

from flows.preflight import preflight
from keystep.config import ConfigError, DistillConfig, build_config, load_config
from tasks.curriculum import Curriculum, curriculum_task
from tasks.difficulty import Difficulty, difficulty_task
from tasks.evaluate import Evaluation, evaluate_task, publish_results, write_summary
from tasks.ingest import Dataset, ingest_task
from tasks.stage import NotCached, cached_output, from_catalog, use_workspace, workspace_of
from tasks.steps import Steps, split_steps_task
from tasks.student import Student, init_student_task
from tasks.teacher import Generation, finish_task, generation_lineage, plan_task, retryable_failures, shard_task
from tasks.teacher_backends import open_endpoint
from tasks.token_weights import TokenWeights, needs_token_weights, token_weights_task
from tasks.train import Trained, train_task
from tasks.warmup import predictor_warmup_epochs, scorer_warmup_epochs, warm_up_task


class Generated(BaseModel):
    train_dataset: Dataset
    eval_datasets: list[Dataset]
    generation: Generation


class Prepared(Generated):
    student: Student
    steps: Steps
    token_weights: TokenWeights | None = None
    difficulty: Difficulty | None = None
    curriculum: Curriculum | None = None


class TrainedRun(Prepared):
    trained: Trained


class EvaluatedRun(TrainedRun):
    evaluation: Evaluation
    report: str


def run_task(stage, *args, **kwargs):
    """How the flows run a stage: call its Prefect task (cached by the stage's fingerprint)."""
    return stage(*args, **kwargs)


def teacher_rationales(config: DistillConfig, dataset: Dataset, run=run_task) -> Generation:
    """plan (here) -> shards (mapped over the task runner: threads, Dask or Ray) -> finish (here, cached)."""
    ws = workspace_of(config)
    done = cached_output(ws.catalog(), generation_lineage(config, dataset), Generation)
    if done and not retryable_failures(config, done):  # done: only the cached finish runs
        return run(finish_task, config, dataset)
    if run is not run_task:
        raise NotCached("teacher-rationales")
    t0 = time.perf_counter()
    plan = plan_task(config, dataset)
    if plan.shards:
        with open_endpoint(config.teacher, ws.root / "logs" / f"vllm-{plan.teacher_fp}.log") as endpoint:
            futures = shard_task.map(unmapped(config.teacher), plan.shards, unmapped(endpoint))
            futures.wait()
            failed = [f for f in futures if f.state.is_failed()]
            if failed:
                failed[0].result()  # re-raise the first shard's error (finished parts stay in the spool)
    if done:   # a rerun that asked again for failed items: count them anew under the same fingerprint
        return finish_task.with_options(refresh_cache=True)(config, dataset, time.perf_counter() - t0, refresh=True)
    return finish_task(config, dataset, time.perf_counter() - t0)


# ---- the DAG, once: each phase's stages, given how to run a stage ----------------------------------------------
def generate_stages(config: DistillConfig, run=run_task) -> Generated:
    train_ds = run(ingest_task, config, config.data.train)
    eval_ds = [run(ingest_task, config, spec, exclude=train_ds) for spec in config.data.eval]
    generation = teacher_rationales(config, train_ds, run)
    return Generated(train_dataset=train_ds, eval_datasets=eval_ds, generation=generation)


def prepare_stages(config: DistillConfig, generated: Generated, run=run_task) -> Prepared:
    gen = generated.generation
    student = run(init_student_task, config, gen)
    steps = run(split_steps_task, config, gen, student)
    out = Prepared(**dict(generated), student=student, steps=steps)
    if needs_token_weights(config):
        epochs = predictor_warmup_epochs(config)
        predictor = run(warm_up_task, config, gen, student, epochs) if epochs else student
        out.token_weights = run(token_weights_task, config, gen, steps, predictor)
        epochs = scorer_warmup_epochs(config)
        scorer = run(warm_up_task, config, gen, student, epochs) if epochs else student
        out.difficulty = run(difficulty_task, config, gen, steps, out.token_weights, scorer)
    if config.train.loss == "kpod":
        out.curriculum = run(curriculum_task, config, gen, out.difficulty)
    return out


def train_stages(config: DistillConfig, p: Prepared, run=run_task) -> TrainedRun:
    trained = run(train_task, config, p.generation, p.student, p.steps, p.token_weights, p.curriculum)
    return TrainedRun(**dict(p), trained=trained)


def evaluate_stages(config: DistillConfig, t: TrainedRun, run=run_task) -> EvaluatedRun:
    evaluation = run(evaluate_task, config, t.trained, t.student, t.eval_datasets)
    report = str(workspace_of(config).report_path(evaluation.fp))
    if run is run_task:
        write_summary(config, evaluation, t.generation, [t.train_dataset, *t.eval_datasets], t.trained, t.curriculum)
        publish_results(config, evaluation, report)
    elif not Path(report).exists():
        raise NotCached("report")
    return EvaluatedRun(**dict(t), evaluation=evaluation, report=report)


def from_catalog_run(config: DistillConfig) -> EvaluatedRun | None:
    """The whole run read from the catalog when every stage already ran with these inputs (nothing runs, no Prefect
    server starts); None when some stage has yet to run."""
    def lookup(stage, *args, **kwargs):
        return from_catalog(config, stage, *args, **kwargs)

    try:
        return evaluate_stages(config, train_stages(config, prepare_stages(
            config, generate_stages(config, lookup), lookup), lookup), lookup)
    except NotCached:
        return None


# ---- the flows ----------------------------------------------------------------------------------------
@flow(name="generate", log_prints=True)
def generate(config: DistillConfig = DistillConfig()) -> Generated:
    """Ingest the training and evaluation sets and generate teacher rationales for the training set."""
    use_workspace(config)
    return generate_stages(config)


@flow(name="prepare", log_prints=True)
def prepare(config: DistillConfig = DistillConfig(), generated: Generated | None = None) -> Prepared:
    """Build the student before distillation (tokenizer + model) and split the rationales into steps; for KPOD
    also the warm-ups, token weights (§4.1), step difficulty (§4.2) and the curriculum (§4.3)."""
    generated = generated or generate(config)
    use_workspace(config)
    return prepare_stages(config, generated)


@flow(name="train", log_prints=True)
def train(config: DistillConfig = DistillConfig(), prepared: Prepared | None = None) -> TrainedRun:
    """Train the student on the prepared rationales; resumes from the last whole epoch."""
    prepared = prepared or prepare(config)
    use_workspace(config)
    return train_stages(config, prepared)


@flow(name="evaluate", log_prints=True)
def evaluate(config: DistillConfig = DistillConfig(), trained: TrainedRun | None = None) -> EvaluatedRun:
    """Evaluate the trained (and untrained) student; publish the results table and the summary report."""
    trained = trained or train(config)
    use_workspace(config)
    return evaluate_stages(config, trained)


def record_run_start(config: DistillConfig, run_id: str, flow_run_id: str | None) -> None:
    workspace_of(config).catalog().query("run_started", run_id=run_id, flow_run_id=flow_run_id,
                                         config_json=json.dumps(config.model_dump(mode="json")))


def record_run_end(config: DistillConfig, run_id: str, out: EvaluatedRun | None) -> dict | None:
    """The run's row in table `runs`: completed with its summary, or failed (`out` None)."""
    summary = None if out is None else {
        "run_id": run_id, "workspace": str(workspace_of(config).root), "report": out.report,
        "accuracy": out.evaluation.accuracy, "eval_fp": out.evaluation.fp, "train_fp": out.trained.fp,
        "final_dir": out.trained.final_dir}
    workspace_of(config).catalog().query("run_finished", run_id=run_id, status="failed" if out is None else "completed",
                                         summary_json=json.dumps(summary) if summary else None)
    return summary


def resolve_config(config: DistillConfig, preset: str | None, overrides: dict[str, Any] | None) -> DistillConfig:
    """The run's config: `preset` (then `overrides` on it), or the config fields (then `overrides` on them).
    A preset together with edited config fields is refused: one of them would be silently ignored."""
    if preset:
        if config != DistillConfig():
            raise ConfigError(f"preset '{preset}' and edited config fields given together; keep the config fields at "
                              "their defaults and change keys through overrides, e.g. {\"train.epochs\": 2}, or clear "
                              "preset to run the config fields")
        return load_config(preset, overrides)
    return build_config(config.model_dump(mode="json"), overrides) if overrides else config


def label_run(config: DistillConfig, preset: str | None) -> None:
    """Tags (and, unless the caller named it, a name) that say what the run is: preset, loss, format, dataset."""
    ctx = get_run_context()
    what = [Path(preset).stem if preset else "config", config.train.loss, config.data.train.name]
    if config.train.target_format != "cot_then_label":
        what.insert(2, config.train.target_format)
    tags = sorted({*ctx.flow_run.tags, f"preset:{what[0]}", f"loss:{config.train.loss}",
                   f"format:{config.train.target_format}", f"dataset:{config.data.train.name}"})
    name = None if ctx.flow.flow_run_name else "-".join([*what, ctx.flow_run.name])
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, name=name, tags=tags)


@flow(name="distill", log_prints=True)
def distill(config: DistillConfig = DistillConfig(), preset: str | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """End to end: generate -> prepare -> train -> evaluate.

    Either `preset` — a YAML file such as configs/demo.yaml, relative to the working directory — or the config
    fields; `overrides` (dotted keys, {"train.epochs": 2}) apply on top of either. With a preset, leave the config
    fields at their defaults: a preset with edited fields is refused rather than one of them silently ignored.
    """
    config = resolve_config(config, preset, overrides)
    preflight(config, check_teacher_endpoint=False)   # a deployment run with a bad input fails here, in seconds
    label_run(config, preset)
    use_workspace(config)
    run_id = str(get_run_context().flow_run.id)
    record_run_start(config, run_id, flow_run_id=run_id)
    try:
        out = evaluate(config, train(config, prepare(config, generate(config))))
    except BaseException:
        record_run_end(config, run_id, None)
        raise
    summary = record_run_end(config, run_id, out)
    publish_results(config, out.evaluation, out.report)   # the run the user started carries the results too
    get_run_logger().info("results: %s (report %s)", summary["accuracy"], out.report)
    return summary
