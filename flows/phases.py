"""What the flows compose, below them: the phase outputs (`GeneratePhase` ... `EvaluatePhase`), the two ways of
running a stage (`PrefectStages`: as its cached Prefect task; `CatalogStages`: read from the catalog, nothing runs),
the DAG written once as four phase functions (`generate_stages` ... `evaluate_stages`; the prepare phase can stop
after the steps), the export stage after them, and which config a flow run runs (`distill_config`: preset,
overrides, the deployment's own config). flows/distill.py, flows/tracking.py and flows/export.py import this module;
it imports none of them.
"""
from __future__ import annotations

from typing import Any, Literal

from prefect import get_client, get_run_logger
from prefect.context import get_run_context
from pydantic import BaseModel

from keystep.config import ConfigError, DistillConfig, build_config, load_config
from tasks.curriculum import CURRICULUM, Curriculum, CurriculumInputs
from tasks.difficulty import DIFFICULTY, Difficulty, DifficultyInputs
from tasks.evaluate import EVALUATE, EvaluateInputs, Evaluation, write_summary
from tasks.export import EXPORT, ExportInputs, push_to_hub
from tasks.ingest import INGEST, Dataset, IngestInputs
from tasks.stage import NotCached, Stage, StageInputs, StageOutput, workspace_of
from tasks.steps import STEPS, Steps, StepsInputs
from tasks.student import STUDENT, Student, StudentInputs
from tasks.teacher import GENERATE, GenerateInputs, Generation, teacher_rationales
from tasks.teacher_scores import TEACHER_SCORES, TeacherScores, TeacherScoresInputs
from tasks.token_weights import TOKEN_WEIGHTS, TokenWeights, TokenWeightsInputs
from tasks.train import TRAIN, TrainInputs, Trained
from tasks.warmup import WARMUP, WarmupInputs


class GeneratePhase(BaseModel):
    """The generate phase's outputs: the ingested datasets and the teacher's rationales."""
    train_dataset: Dataset
    eval_datasets: list[Dataset]
    generation: Generation


class PreparePhase(GeneratePhase):
    """... and the prepare phase's: the student before distillation, steps, the teacher's scores when a scoring
    teacher is set, and for KPOD its inputs."""
    student: Student
    steps: Steps
    teacher_scores: TeacherScores | None = None
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

    def __call__(self, stage: Stage, config: DistillConfig, inputs: StageInputs) -> StageOutput:
        return stage(config, inputs)

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

    def __call__(self, stage: Stage, config: DistillConfig, inputs: StageInputs) -> StageOutput:
        return stage.from_catalog(config, inputs)

    def teacher(self, config: DistillConfig, dataset: Dataset) -> Generation:
        return GENERATE.from_catalog(config, GenerateInputs(dataset=dataset))

    def report(self, config: DistillConfig, evaluation: Evaluation, t: "TrainPhase") -> str:
        report = workspace_of(config).report_path(evaluation.fp)
        if not report.exists():
            raise NotCached("report")
        return str(report)


class LineageStages:
    """The same DAG with nothing read and nothing run: each stage's output is only its fingerprint, computed by its
    lineage from the config and the upstream fingerprints — a run's fingerprints on a machine where it never ran
    (`keystep unpack`). `lineages` keeps the last lineage computed for each stage name."""

    def __init__(self):
        self.lineages: dict[str, Any] = {}

    def __call__(self, stage: Stage, config: DistillConfig, inputs: StageInputs) -> StageOutput:
        self.lineages[stage.name] = lineage = stage.lineage(config, inputs)
        return stage.output.model_construct(fp=lineage.fp)

    def teacher(self, config: DistillConfig, dataset: Dataset) -> Generation:
        return self(GENERATE, config, GenerateInputs(dataset=dataset))


PREFECT = PrefectStages()


# ---- the DAG, once: each phase's stages, given how to run a stage ----------------------------------------------
def generate_stages(config: DistillConfig, run=PREFECT) -> GeneratePhase:
    train_ds = run(INGEST, config, IngestInputs(spec=config.data.train))
    eval_ds = [run(INGEST, config, IngestInputs(spec=spec, exclude=train_ds)) for spec in config.data.eval]
    generation = run.teacher(config, train_ds)
    return GeneratePhase(train_dataset=train_ds, eval_datasets=eval_ds, generation=generation)


def prepare_stages(config: DistillConfig, generated: GeneratePhase, run=PREFECT,
                   upto: Literal["steps"] | None = None) -> PreparePhase:
    """The student before distillation, the steps and the teacher's scores, then what KPOD reads; `upto="steps"`
    stops there (what the export reads when no KPOD stage ran)."""
    gen = generated.generation
    student = run(STUDENT, config, StudentInputs(generation=gen))
    steps = run(STEPS, config, StepsInputs(generation=gen, student=student))
    out = PreparePhase(**dict(generated), student=student, steps=steps)
    if config.teacher_scores.model:
        out.teacher_scores = run(TEACHER_SCORES, config, TeacherScoresInputs(generation=gen, student=student))
    if upto == "steps":
        return out
    if config.needs_token_weights:
        def warmed_up(epochs: int) -> Student:   # KPOD's student before distillation (tasks/warmup.py)
            return run(WARMUP, config, WarmupInputs(
                generation=gen, student=student, epochs=epochs)) if epochs else student

        out.token_weights = run(TOKEN_WEIGHTS, config, TokenWeightsInputs(
            generation=gen, steps=steps, predictor=warmed_up(config.predictor_warmup_epochs)))
        out.difficulty = run(DIFFICULTY, config, DifficultyInputs(
            generation=gen, steps=steps, token_weights=out.token_weights, scorer=warmed_up(config.scorer_warmup_epochs)))
    if config.needs_curriculum:
        out.curriculum = run(CURRICULUM, config, CurriculumInputs(generation=gen, difficulty=out.difficulty))
    return out


def train_stages(config: DistillConfig, p: PreparePhase, run=PREFECT) -> TrainPhase:
    trained = run(TRAIN, config, TrainInputs(generation=p.generation, student=p.student, steps=p.steps,
                                             token_weights=p.token_weights, curriculum=p.curriculum,
                                             teacher_scores=p.teacher_scores))
    return TrainPhase(**dict(p), trained=trained)


def evaluate_stages(config: DistillConfig, t: TrainPhase, run=PREFECT) -> EvaluatePhase:
    evaluation = run(EVALUATE, config, EvaluateInputs(trained=t.trained, student=t.student, datasets=t.eval_datasets))
    return EvaluatePhase(**dict(t), evaluation=evaluation, report=run.report(config, evaluation, t))


def planned_run(config: DistillConfig) -> LineageStages:
    """The lineages of a run's stages up to training, computed without running or reading anything."""
    run = LineageStages()
    train_stages(config, prepare_stages(config, generate_stages(config, run), run), run)
    return run


def from_catalog_run(config: DistillConfig) -> EvaluatePhase | None:
    """The whole run read from the catalog when every stage already ran with these inputs (nothing runs, no Prefect
    server starts); None when some stage has yet to run."""
    run = CatalogStages(config)
    try:
        return evaluate_stages(config, train_stages(config, prepare_stages(config, generate_stages(config, run), run),
                                                    run), run)
    except NotCached:
        return None


# ---- the export stage, after the phases ----------------------------------------------------------
def export_inputs(p: PreparePhase) -> ExportInputs:
    """What the export stage reads of the prepare phase."""
    return ExportInputs(generation=p.generation, student=p.student, steps=p.steps, token_weights=p.token_weights,
                        difficulty=p.difficulty, teacher_scores=p.teacher_scores)


def export_stages(config: DistillConfig, inputs: ExportInputs) -> dict[str, Any]:
    """The export stage, then the hub upload when `export.push_to_hub` names a repo (never cached)."""
    out = EXPORT(config, inputs)
    url = push_to_hub(config, out) if config.export.push_to_hub else None
    if url:
        get_run_logger().info("uploaded %s to %s", out.out_dir, url)
    return {**out.model_dump(), "hub_url": url}


# ---- which config a flow run runs ---------------------------------------------------------------------
def deployment_config() -> DistillConfig | None:
    """The `config` parameter of the deployment this flow run came from (None outside a deployment)."""
    ctx = get_run_context()
    if not ctx.flow_run.deployment_id:
        return None
    with get_client(sync_client=True) as client:
        raw = client.read_deployment(ctx.flow_run.deployment_id).parameters.get("config")
    return DistillConfig.model_validate(raw) if raw else None


def resolve_config(config: DistillConfig, preset: str | None, overrides: dict[str, Any] | None,
                   deployed: DistillConfig | None = None) -> DistillConfig:
    """The run's config: `preset` (then `overrides` on it), or the config fields (then `overrides` on them).
    A preset together with edited config fields is refused: one of them would be silently ignored. Fields left as
    the deployment (`deployed`) set them, or equal to what the preset resolves to (a rerun of an earlier run), are
    not edits."""
    if preset:
        resolved = load_config(preset, overrides)
        if config not in (DistillConfig(), resolved, deployed):
            raise ConfigError(f"preset '{preset}' and edited config fields given together; clear preset to run the "
                              "config fields (change a key through overrides, e.g. {\"train.epochs\": 2}), or leave "
                              "the config fields as they were")
        return resolved
    return build_config(config.model_dump(mode="json"), overrides) if overrides else config


def distill_config(config: DistillConfig, preset: str | None, overrides: dict[str, Any] | None) -> DistillConfig:
    """The config a flow run with these parameters runs (`resolve_config`, knowing its deployment's own config)."""
    return resolve_config(config, preset, overrides, deployment_config())
