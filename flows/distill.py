"""The `distill` flow and its phases: generate -> prepare -> train -> evaluate.

Flows only compose stage tasks. Each phase is a flow of its own (and a deployment); given no upstream
references it runs the phases before it, whose tasks are cached by fingerprint, so running `train` alone
after `generate` recomputes nothing upstream.
"""
from __future__ import annotations

import json
import time

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.context import get_run_context

from keystep.config import DistillConfig, build_config, load_config
from storage.workspace import Workspace
from tasks.curriculum import curriculum_fingerprint, curriculum_task
from tasks.difficulty import difficulty_fingerprint, difficulty_task
from tasks.evaluate import eval_fingerprint, evaluate_task, publish_summary
from tasks.ingest import dataset_fingerprint, ingest_task
from tasks.keypoints import token_weights_task, weights_fingerprint
from tasks.prefect_stage import in_workspace
from tasks.steps import split_steps_task, steps_fingerprint
from tasks.student import init_student_task, student_fingerprint
from tasks.teacher import finish_task, generation_fingerprint, plan_task, shard_task
from tasks.teacher_backends import open_endpoint
from tasks.train import train_fingerprint, train_task


def _ws(config: DistillConfig) -> Workspace:
    return Workspace(config.storage.workspace)


def generate_rationales(config: DistillConfig, ws: Workspace, dataset_fp: str) -> dict[str, Any]:
    """plan (here) -> shards (mapped over the task runner: threads, Dask or Ray) -> finish (here, cached)."""
    fp = generation_fingerprint(config.teacher, dataset_fp)
    finish = in_workspace(finish_task, ws)
    if ws.catalog().stage_output(fp):  # already generated: only the cached finish step runs
        return finish(str(ws.root), config.teacher, dataset_fp, fp)
    t0 = time.perf_counter()
    plan = plan_task(str(ws.root), config.teacher, dataset_fp)
    if plan["shards"]:
        with open_endpoint(config.teacher, ws.root / "logs" / f"vllm-{plan['teacher_fp']}.log") as endpoint:
            futures = shard_task.map(unmapped(config.teacher), plan["shards"], unmapped(endpoint))
            futures.wait()
            failed = [f for f in futures if f.state.is_failed()]
            if failed:
                failed[0].result()  # re-raise the first shard's error (finished parts stay in the spool)
    return finish(str(ws.root), config.teacher, dataset_fp, fp, time.perf_counter() - t0)


@flow(name="generate", log_prints=True)
def generate(config: DistillConfig = DistillConfig()) -> dict[str, Any]:
    """Ingest the training and evaluation sets and generate teacher rationales for the training set."""
    ws = _ws(config)
    ingest = in_workspace(ingest_task, ws)
    train_fp = dataset_fingerprint(config.data.train)
    train_ds = ingest(str(ws.root), config.data.train, train_fp)
    eval_ds = []
    for spec in config.data.eval:
        fp = dataset_fingerprint(spec, exclude_fp=train_fp)
        eval_ds.append(ingest(str(ws.root), spec, fp, exclude_dataset_fp=train_fp))
    gen = generate_rationales(config, ws, train_fp)
    return {"train_dataset": train_ds, "eval_datasets": eval_ds, "generation": gen}


@flow(name="prepare", log_prints=True)
def prepare(config: DistillConfig = DistillConfig(), generated: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the student before distillation (tokenizer + model) and split the rationales into steps; for KPOD
    also token weights (§4.1), step difficulty (§4.2) and the curriculum (§4.3)."""
    generated = generated or generate(config)
    ws, gen = _ws(config), generated["generation"]
    s_fp = student_fingerprint(config.student, gen["fingerprint"])
    student = in_workspace(init_student_task, ws)(str(ws.root), config.student, config.teacher.keep_only_correct, gen, s_fp)
    st_fp = steps_fingerprint(config.steps, gen["fingerprint"], s_fp)
    steps = in_workspace(split_steps_task, ws)(str(ws.root), config.steps, config.teacher, gen, student, st_fp)
    out = {**generated, "student": student, "steps": steps}
    needs_weights = config.train.loss == "kpod" or config.train.target_format == "label_then_keytokens"
    if config.masks.compute or needs_weights:  # KPOD §4.1-4.2: token weights, then step difficulty
        w_fp = weights_fingerprint(config.masks, st_fp, s_fp)
        weights = in_workspace(token_weights_task, ws)(str(ws.root), config.masks, config.teacher, gen, steps, student,
                                                       config.student.max_length, w_fp)
        d_fp = difficulty_fingerprint(config.difficulty, w_fp, s_fp)
        out["token_weights"] = weights
        out["difficulty"] = in_workspace(difficulty_task, ws)(
            str(ws.root), config.difficulty, config.teacher, gen, steps, weights, student,
            config.student.model == "scratch", config.student.max_length, d_fp)
    if config.train.loss == "kpod":
        c_fp = curriculum_fingerprint(config.curriculum, d_fp, config.train.epochs)
        out["curriculum"] = in_workspace(curriculum_task, ws)(str(ws.root), config.curriculum, config.teacher, gen,
                                                              out["difficulty"], config.train.epochs, c_fp)
    return out


@flow(name="train", log_prints=True)
def train(config: DistillConfig = DistillConfig(), prepared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the student on the prepared rationales; resumes from the last whole epoch."""
    prepared = prepared or prepare(config)
    ws = _ws(config)
    kpod, upstream = None, None   # what KPOD training / the key-token format read, and their fingerprints
    if config.train.loss == "kpod":
        cur = prepared["curriculum"]
        kpod = {"weights_fp": prepared["token_weights"]["weights_fp"], "steps_fp": prepared["steps"]["steps_fp"],
                "shards_dir": cur["shards_dir"], "stages": cur["stages"]}
        upstream = [kpod["weights_fp"], cur["curriculum_fp"]]
    elif config.train.target_format == "label_then_keytokens":
        kpod = {"weights_fp": prepared["token_weights"]["weights_fp"]}
        upstream = [kpod["weights_fp"]]
    fp = train_fingerprint(config.train, prepared["student"]["student_fp"], prepared["steps"]["steps_fp"],
                           prepared["generation"]["fingerprint"], upstream)
    trained = in_workspace(train_task, ws)(str(ws.root), config.train, config.teacher, prepared["generation"],
                                           prepared["student"], fp, config.student.max_length,
                                           config.model_dump(mode="json"), kpod)
    return {**prepared, "train": trained}


@flow(name="evaluate", log_prints=True)
def evaluate(config: DistillConfig = DistillConfig(), trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the trained (and untrained) student; publish the results table and the summary report."""
    trained = trained or train(config)
    ws = _ws(config)
    datasets = trained["eval_datasets"]
    fp = eval_fingerprint(config.eval, trained["train"]["train_fp"], [d["dataset_fp"] for d in datasets], config.teacher,
                          config.train.target_format)
    result = in_workspace(evaluate_task, ws)(str(ws.root), config.eval, config.teacher, trained["train"],
                                             trained["student"], datasets, fp, config.train.device,
                                             config.train.target_format)
    report = publish_summary(str(ws.root), config.data.train.name, fp, trained["generation"],
                             [trained["train_dataset"], *datasets], trained["train"], trained.get("curriculum"))
    return {**trained, "evaluation": result, "report": report}


@flow(name="distill", log_prints=True)
def distill(config: DistillConfig = DistillConfig(), preset: str | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """End to end: generate -> prepare -> train -> evaluate.

    `preset` (a YAML file such as configs/demo.yaml, relative to the working directory) replaces `config`;
    `overrides` are dotted keys applied on top ({"train.epochs": 2}).
    """
    if preset:
        config = load_config(preset, overrides)
    elif overrides:
        config = build_config(config.model_dump(mode="json"), overrides)
    ws = _ws(config)
    catalog = ws.catalog()
    run_id = str(get_run_context().flow_run.id)
    catalog.execute("insert or replace into runs (run_id, flow_run_id, config_json, status) values (?, ?, ?, 'running')",
                    [run_id, run_id, json.dumps(config.model_dump(mode="json"))])
    try:
        out = evaluate(config, train(config, prepare(config, generate(config))))
    except BaseException:
        catalog.execute("update runs set status = 'failed', finished_at = current_timestamp where run_id = ?", [run_id])
        raise
    summary = {"run_id": run_id, "workspace": str(ws.root), "report": out["report"],
               "accuracy": out["evaluation"]["accuracy"], "eval_fp": out["evaluation"]["eval_fp"],
               "train_fp": out["train"]["train_fp"]}
    catalog.execute("update runs set status = 'completed', finished_at = current_timestamp, summary_json = ? "
                    "where run_id = ?", [json.dumps(summary), run_id])
    get_run_logger().info("results: %s (report %s)", summary["accuracy"], out["report"])
    return summary
