"""The `distill` flow and its phases as flows: generate -> prepare -> train -> evaluate.

Flows only compose: each phase flow runs its phase function (flows/phases.py: one line a stage, each stage's task
cached by its fingerprint, returning the typed output the next stages take). Each phase is a flow of its own (and a
deployment); given no upstream outputs it runs the phases before it, whose tasks are cache hits, so running `train`
alone after `generate` recomputes nothing upstream.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from flows.phases import (EvaluatePhase, GeneratePhase, PreparePhase, TrainPhase, distill_config, evaluate_stages,
                          export_inputs, export_stages, generate_stages, prepare_stages, train_stages)
from flows.tracking import RunSummary, tracked_run
from keystep.config import DistillConfig
from tasks.evaluate import publish_results


# ---- the flows ----------------------------------------------------------------------------------------
@flow(name="generate", log_prints=True)
def generate(config: DistillConfig = DistillConfig()) -> GeneratePhase:
    """Ingest the training and evaluation sets and generate teacher rationales for the training set."""
    return generate_stages(config)


@flow(name="prepare", log_prints=True)
def prepare(config: DistillConfig = DistillConfig(), generated: GeneratePhase | None = None) -> PreparePhase:
    """Build the student before distillation (tokenizer + model) and split the rationales into steps; for KPOD
    also the warm-ups, token weights (§4.1), step difficulty (§4.2) and the curriculum (§4.3)."""
    generated = generated or generate(config)
    return prepare_stages(config, generated)


@flow(name="train", log_prints=True)
def train(config: DistillConfig = DistillConfig(), prepared: PreparePhase | None = None) -> TrainPhase:
    """Train the student on the prepared rationales; resumes from the last whole epoch."""
    prepared = prepared or prepare(config)
    return train_stages(config, prepared)


@flow(name="evaluate", log_prints=True)
def evaluate(config: DistillConfig = DistillConfig(), trained: TrainPhase | None = None,
             publish: bool = True) -> EvaluatePhase:
    """Evaluate the trained (and untrained) student; publish the results table and the summary report.

    Args:
        publish: Publish the results table and report as this run's artifacts (`distill` passes False: it
            publishes them on the run the user started, with the run's header).
    """
    trained = trained or train(config)
    out = evaluate_stages(config, trained)
    if publish:
        publish_results(config, out.evaluation, out.report)
    return out


@flow(name="distill", log_prints=True)
def distill(preset: str | None = None, overrides: dict[str, Any] | None = None,
            config: DistillConfig = DistillConfig()) -> RunSummary:
    """End to end: generate -> prepare -> train -> evaluate.

    Args:
        preset: Optional. A YAML preset such as configs/demo.yaml (relative to the working directory); when set it
            is what runs, and the config fields below must stay as they are (a preset with edited fields is refused).
        overrides: Optional. Dotted keys applied on top of the preset or of the config fields, e.g.
            {"train.epochs": 2, "data.train.n": 500}.
        config: The run's config, section by section. A deployment opens it on its preset's values: change a
            field here (and leave preset empty) to run exactly that.
    """
    config = distill_config(config, preset, overrides)
    with tracked_run(config, preset, overrides) as run:
        out = run.phase(evaluate, run.phase(train, run.phase(prepare, run.phase(generate))), publish=False)
        exported = export_stages(config, export_inputs(out)) if config.export.enabled else None
        run.finished(out, exported)
    return run.summary
