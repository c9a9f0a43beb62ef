"""The `experiment` flow: a grid of named variants × seeds, each a `distill` run, and one comparison table.

Variants share a workspace, so stages they have in common (ingest, teacher, steps, token weights, difficulty)
run once: the second arm finds them by fingerprint. The flow only composes: arm configs come from
keystep.config, the table, plot and markdown from tasks/compare.py.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.distill import distill
from keystep.config import ExperimentConfig, arm_config, load_experiment
from storage.workspace import Workspace
from tasks.compare import compare_task


@flow(name="experiment", log_prints=True)
def experiment(preset: str | None = None, config: ExperimentConfig | None = None,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every variant × seed of an experiment file (e.g. configs/study-synthetic.yaml) and compare them."""
    if preset:
        config = load_experiment(preset, overrides)
    if config is None:
        raise ValueError("experiment needs `preset` (an experiment YAML such as configs/study-synthetic.yaml) or `config`")
    logger = get_run_logger()
    runs = []
    for variant in config.variants:
        for seed in config.seeds:
            cfg = arm_config(config, variant, seed)
            logger.info("arm %s, seed %d", variant, seed)
            out = distill.with_options(flow_run_name=f"{variant}-seed{seed}")(config=cfg)
            runs.append({"variant": variant, "seed": seed, "accuracy": out["accuracy"], "train_fp": out["train_fp"],
                         "eval_fp": out["eval_fp"]})
    ws = Workspace(arm_config(config, next(iter(config.variants)), config.seeds[0]).storage.workspace)
    report = compare_task(config.name, runs, str(ws.root), config.results_path, [tuple(g) for g in config.gaps])
    return {"runs": runs, **report}
