"""The `distill` flow and its phases: generate -> prepare -> train -> evaluate.

Flows only compose stage tasks, one line a stage; each task is cached by its stage's fingerprint and returns the
stage's typed output, which the next stages take as arguments. Each phase is a flow of its own (and a deployment);
given no upstream outputs it runs the phases before it, whose tasks are cache hits, so running `train` alone after
`generate` recomputes nothing upstream.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from pydantic import BaseModel

from flows.tracking import RunSummary, distill_config, tracked_run
from keystep.config import DistillConfig
from tasks.curriculum import Curriculum, curriculum_task
from tasks.difficulty import Difficulty, difficulty_task
from tasks.evaluate import Evaluation, evaluate_task, publish_results, write_summary
from tasks.export import export_task, push_to_hub
from tasks.ingest import Dataset, ingest_task
from tasks.stage import NotCached, from_catalog, use_workspace, workspace_of
from tasks.steps import Steps, split_steps_task
from tasks.student import Student, init_student_task
from tasks.teacher import Generation, finished_generation, teacher_rationales
from tasks.token_weights import TokenWeights, token_weights_task
from tasks.train import Trained, train_task
from tasks.warmup import warm_up_task


class GeneratePhase(BaseModel):
    """The generate phase's outputs: the ingested datasets and the teacher's rationales."""
    train_dataset: Dataset
    eval_datasets: list[Dataset]
    generation: Generation


class PreparePhase(GeneratePhase):
    """... and the prepare phase's: the student before distillation, steps, and for KPOD its inputs."""
    student: Student
    steps: Steps
    token_weights: TokenWeights | None = None
    difficulty: Difficulty | None = None
    curriculum: Curriculum | None = None


class TrainPhase(PreparePhase):
    """... and the train stage's output (`Trained`; the loop's own state is tasks/training.py's `LoopState`)."""
    trained: Trained


class EvaluatePhase(TrainPhase):
    """... and the evaluation, with the run's report."""
    evaluation: Evaluation
    report: str


class PrefectStages:
    """How the flows run the DAG: each stage as its Prefect task, cached by the stage's fingerprint."""

    def __call__(self, stage, *args, **kwargs):
        return stage(*args, **kwargs)

    def teacher(self, config: DistillConfig, dataset: Dataset) -> Generation:
        return teacher_rationales(config, dataset)       # plan -> shards (or batches) -> finish

    def report(self, config: DistillConfig, evaluation: Evaluation, t: "TrainPhase") -> str:
        return write_summary(config, evaluation, t.generation, [t.train_dataset, *t.eval_datasets], t.trained,
                             t.curriculum)


class CatalogStages:
    """The same DAG read from the catalog: nothing runs and no Prefect server starts; `NotCached` where a stage has
    yet to run with these inputs."""

    def __init__(self, config: DistillConfig):
        self.config = config

    def __call__(self, stage, *args, **kwargs):
        return from_catalog(self.config, stage, *args, **kwargs)

    def teacher(self, config: DistillConfig, dataset: Dataset) -> Generation:
        done = finished_generation(config, dataset)
        if done is None:
            raise NotCached("generate")
        return done

    def report(self, config: DistillConfig, evaluation: Evaluation, t: "TrainPhase") -> str:
        report = workspace_of(config).report_path(evaluation.fp)
        if not report.exists():
            raise NotCached("report")
        return str(report)


PREFECT = PrefectStages()


# ---- the DAG, once: each phase's stages, given how to run a stage ----------------------------------------------
def generate_stages(config: DistillConfig, run=PREFECT) -> GeneratePhase:
    train_ds = run(ingest_task, config, config.data.train)
    eval_ds = [run(ingest_task, config, spec, exclude=train_ds) for spec in config.data.eval]
    generation = run.teacher(config, train_ds)
    return GeneratePhase(train_dataset=train_ds, eval_datasets=eval_ds, generation=generation)


def prepare_stages(config: DistillConfig, generated: GeneratePhase, run=PREFECT) -> PreparePhase:
    gen = generated.generation
    student = run(init_student_task, config, gen)
    steps = run(split_steps_task, config, gen, student)
    out = PreparePhase(**dict(generated), student=student, steps=steps)
    if config.needs_token_weights:
        epochs = config.predictor_warmup_epochs
        predictor = run(warm_up_task, config, gen, student, epochs) if epochs else student
        out.token_weights = run(token_weights_task, config, gen, steps, predictor)
        epochs = config.scorer_warmup_epochs
        scorer = run(warm_up_task, config, gen, student, epochs) if epochs else student
        out.difficulty = run(difficulty_task, config, gen, steps, out.token_weights, scorer)
    if config.needs_curriculum:
        out.curriculum = run(curriculum_task, config, gen, out.difficulty)
    return out


def train_stages(config: DistillConfig, p: PreparePhase, run=PREFECT) -> TrainPhase:
    trained = run(train_task, config, p.generation, p.student, p.steps, p.token_weights, p.curriculum)
    return TrainPhase(**dict(p), trained=trained)


def evaluate_stages(config: DistillConfig, t: TrainPhase, run=PREFECT) -> EvaluatePhase:
    evaluation = run(evaluate_task, config, t.trained, t.student, t.eval_datasets)
    return EvaluatePhase(**dict(t), evaluation=evaluation, report=run.report(config, evaluation, t))


def from_catalog_run(config: DistillConfig) -> EvaluatePhase | None:
    """The whole run read from the catalog when every stage already ran with these inputs (nothing runs, no Prefect
    server starts); None when some stage has yet to run."""
    run = CatalogStages(config)
    try:
        return evaluate_stages(config, train_stages(config, prepare_stages(config, generate_stages(config, run), run),
                                                    run), run)
    except NotCached:
        return None


# ---- the flows ----------------------------------------------------------------------------------------
@flow(name="generate", log_prints=True)
def generate(config: DistillConfig = DistillConfig()) -> GeneratePhase:
    """Ingest the training and evaluation sets and generate teacher rationales for the training set."""
    use_workspace(config)
    return generate_stages(config)


@flow(name="prepare", log_prints=True)
def prepare(config: DistillConfig = DistillConfig(), generated: GeneratePhase | None = None) -> PreparePhase:
    """Build the student before distillation (tokenizer + model) and split the rationales into steps; for KPOD
    also the warm-ups, token weights (§4.1), step difficulty (§4.2) and the curriculum (§4.3)."""
    generated = generated or generate(config)
    use_workspace(config)
    return prepare_stages(config, generated)


@flow(name="train", log_prints=True)
def train(config: DistillConfig = DistillConfig(), prepared: PreparePhase | None = None) -> TrainPhase:
    """Train the student on the prepared rationales; resumes from the last whole epoch."""
    prepared = prepared or prepare(config)
    use_workspace(config)
    return train_stages(config, prepared)


@flow(name="evaluate", log_prints=True)
def evaluate(config: DistillConfig = DistillConfig(), trained: TrainPhase | None = None) -> EvaluatePhase:
    """Evaluate the trained (and untrained) student; publish the results table and the summary report."""
    trained = trained or train(config)
    use_workspace(config)
    out = evaluate_stages(config, trained)
    if get_run_context().flow_run.parent_task_run_id is None:   # run alone; as distill's phase, distill publishes
        publish_results(config, out.evaluation, out.report)
    return out


def prepared_outputs(p: PreparePhase) -> dict[str, Any]:
    """What the export stage reads of the prepare phase."""
    return {"student": p.student, "steps": p.steps, "token_weights": p.token_weights, "difficulty": p.difficulty}


def export_stages(config: DistillConfig, generation: Generation, prepared: dict[str, Any]) -> dict[str, Any]:
    """The export stage, then the hub upload when `export.push_to_hub` names a repo (never cached)."""
    out = export_task(config, generation, **prepared)
    url = push_to_hub(config, out) if config.export.push_to_hub else None
    if url:
        get_run_logger().info("uploaded %s to %s", out.out_dir, url)
    return {**out.model_dump(), "hub_url": url}


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
        out = run.phase(evaluate, run.phase(train, run.phase(prepare, run.phase(generate))))
        exported = export_stages(config, out.generation, prepared_outputs(out)) if config.export.enabled else None
        run.finished(out, exported)
    return run.summary
