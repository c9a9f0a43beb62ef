"""The `experiment` flow: a grid of named variants × seeds, each a `distill` run, and one comparison table.

Variants share a workspace, so stages they have in common (ingest, teacher, steps, token weights, difficulty)
run once: the second arm finds them by fingerprint. With `pretrain`, that preset runs first (in its own workspace)
and its trained student is every arm's student; with `teacher_preset`, that preset's trained student is every arm's
model teacher (teacher.model, and teacher_scores.model where the loss reads it). Each finished arm writes its result files under the study folder
(tasks/study.py); an arm whose files exist is skipped, so a study can be finished over several sessions, and the
report is built from those files alone. The flow only composes: arm configs come from keystep.config, the files
from tasks/study.py, the table, plots and markdown from tasks/compare.py.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.distill import distill
from keystep.config import ExperimentConfig, arm_config, load_config, load_experiment
from storage.workspace import Workspace
from tasks.compare import compare_task
from tasks.study import finished_run, write_run


class ExperimentSummary(BaseModel):
    """What an `experiment` run returns: the comparison report and the runs it was built from."""
    name: str
    results_path: str
    markdown: str
    columns: list[str]
    runs: list[dict]                    # each finished arm's study-file summary
    missing: list[tuple[str, int]]      # (variant, seed) not run yet
    plots: dict[str, str]


def trained_preset(preset: str, run_name: str) -> str:
    """The trained student folder of a preset run first (`pretrain`: every arm's student; `teacher_preset`: every
    arm's model teacher) — trained once, a cache hit afterwards."""
    return distill.with_options(flow_run_name=run_name)(config=load_config(preset)).final_dir


@flow(name="experiment", log_prints=True)
def experiment(preset: str | None = None, config: ExperimentConfig | None = None,
               overrides: dict[str, Any] | None = None) -> "ExperimentSummary":
    """Run every variant × seed of an experiment file (e.g. configs/study-synthetic.yaml) that has no result files
    yet, then compare them all."""
    if preset:
        config = load_experiment(preset, overrides)
    if config is None:
        raise ValueError("experiment needs `preset` (an experiment YAML such as configs/study-synthetic.yaml) or `config`")
    logger = get_run_logger()
    student_model = teacher_model = None
    for variant, seed in config.plan():
        if finished_run(config, variant, seed):
            logger.info("arm %s, seed %d: done (%s)", variant, seed, config.study_dir)
            continue
        if config.pretrain and student_model is None:
            student_model = trained_preset(config.pretrain, "pretrain")
        if config.teacher_preset and teacher_model is None:
            teacher_model = trained_preset(config.teacher_preset, "teacher")
        cfg = arm_config(config, variant, seed, student_model, teacher_model)
        logger.info("arm %s, seed %d", variant, seed)
        t0 = time.perf_counter()
        out = distill.with_options(flow_run_name=f"{variant}-seed{seed}")(config=cfg)
        write_run(config, variant, seed, Workspace(cfg.storage.workspace).catalog(), out.model_dump(),
                  time.perf_counter() - t0, cfg)
    report = compare_task(config)
    return ExperimentSummary(name=config.name, **{k: report[k] for k in ExperimentSummary.model_fields if k in report})
