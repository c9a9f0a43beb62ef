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

from prefect import flow, get_client, get_run_logger, tags
from prefect.context import get_run_context
from prefect.states import Crashed
from pydantic import BaseModel

from flows.preflight import preflight
from keystep.config import ConfigError, DistillConfig, build_config, load_config
from storage.runs import Heartbeat, reconcile, run_lock, start_run
from tasks.curriculum import Curriculum, curriculum_task
from tasks.difficulty import Difficulty, difficulty_task
from tasks.evaluate import Evaluation, evaluate_task, publish_results, run_header, write_summary
from tasks.export import export_task, push_to_hub
from tasks.ingest import Dataset, ingest_task
from tasks.stage import NotCached, cached_output, from_catalog, use_workspace, workspace_of
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


class RunSummary(BaseModel):
    """What a `distill` run returns; table `runs` keeps it as the run's summary_json."""
    run_id: str
    label: str | None = None      # the preset (or deployment) it was started from
    workspace: str
    report: str
    accuracy: dict[str, float]    # "model/dataset/split" -> accuracy
    eval_fp: str
    train_fp: str
    final_dir: str                # the trained student's folder
    export: str | None = None     # the dataset folder, when export.enabled


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


def record_run_start(config: DistillConfig, run_id: str, flow_run_id: str | None) -> Heartbeat:
    """The run's row in table `runs` ('running', pid, host), kept alive by the returned heartbeat until stopped."""
    return start_run(workspace_of(config).catalog(), run_id, flow_run_id, json.dumps(config.model_dump(mode="json")))


def reconcile_dead_runs(config: DistillConfig, logger) -> None:
    """Runs of this workspace whose process is gone are marked 'killed' in table `runs` and, where the Prefect server
    knows them, Crashed there, so neither the catalog nor the UI shows a dead run as running."""
    ws = workspace_of(config)
    for dead in reconcile(ws.catalog(), ws.root):
        logger.warning("run %s was still marked running but its %s: marked killed", dead["run_id"], dead["reason"])
        if dead["flow_run_id"]:
            try:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(dead["flow_run_id"], Crashed(message=f"keystep: {dead['reason']}"),
                                              force=True)
            except Exception:  # noqa: BLE001 - a run of another (temporary) server is unknown to this one
                pass


def write_run_header(config: DistillConfig, out: EvaluatePhase, label: str, run_id: str, wall_s: float) -> None:
    """The report opens with what ran and the headline (against the untrained student and the previous run)."""
    catalog = workspace_of(config).catalog()
    previous = catalog.query("previous_run", run_id=run_id, label=label)
    header = run_header(label, config, catalog.query("latest_results", eval_fp=out.evaluation.fp),
                        [out.train_dataset, *out.eval_datasets], out.trained, out.student.n_params, wall_s,
                        previous[0] if previous else None)
    report = Path(out.report)
    report.write_text(header + report.read_text())


def record_run_end(config: DistillConfig, run_id: str, out: EvaluatePhase | None, label: str | None = None,
                   export: str | None = None) -> RunSummary | None:
    """The run's row in table `runs`: completed with its summary, or failed (`out` None)."""
    summary = None if out is None else RunSummary(
        run_id=run_id, label=label, workspace=str(workspace_of(config).root), report=out.report,
        accuracy=out.evaluation.accuracy, eval_fp=out.evaluation.fp, train_fp=out.trained.fp,
        final_dir=out.trained.final_dir, export=export)
    workspace_of(config).catalog().query("run_finished", run_id=run_id, status="failed" if out is None else "completed",
                                         summary_json=summary.model_dump_json() if summary else None)
    return summary


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


def export_stages(config: DistillConfig, generation: Generation, prepared: dict[str, Any]) -> dict[str, Any]:
    """The export stage, then the hub upload when `export.push_to_hub` names a repo (never cached)."""
    out = export_task(config, generation, **prepared)
    url = push_to_hub(config, out) if config.export.push_to_hub else None
    if url:
        get_run_logger().info("uploaded %s to %s", out.out_dir, url)
    return {**out.model_dump(), "hub_url": url}


def run_label(preset: str | None) -> str:
    """What the run was started from: its preset's name, else its deployment's, else 'config'."""
    if preset:
        return Path(preset).stem
    ctx = get_run_context()
    if ctx.flow_run.deployment_id:
        with get_client(sync_client=True) as client:
            return client.read_deployment(ctx.flow_run.deployment_id).name
    return "config"


def label_run(config: DistillConfig, preset: str | None, overrides: dict[str, Any] | None) -> tuple[str, list[str]]:
    """Tags (and, unless the caller named it, a name) that say what the run is — preset, loss, format, dataset, e.g.
    `kpod-synthetic-<name>` with tags preset:kpod, loss:kpod, ... — and the run's parameters rewritten to the
    resolved config (with the preset and overrides it came from), so the UI's Parameters tab shows what ran.
    Returns (label, name, tags): the label for the run's summary, name and tags for the phase subflows."""
    ctx = get_run_context()
    label = run_label(preset)
    what = [label] + ([config.train.loss] if config.train.loss.replace("_", "") not in label.replace("-", "") else [])
    if config.train.target_format != "cot_then_label":
        what.append(config.train.target_format)
    what.append(config.data.train.name)
    tags = sorted({*ctx.flow_run.tags, f"preset:{label}", f"loss:{config.train.loss}",
                   f"format:{config.train.target_format}", f"dataset:{config.data.train.name}"})
    name = ctx.flow_run.name if ctx.flow.flow_run_name else "-".join([*what, ctx.flow_run.name])
    shown = {"config": config.model_dump(mode="json"), "preset": preset, "overrides": overrides}
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, name=None if ctx.flow.flow_run_name else name, tags=tags,
                               parameters=shown)
    return label, name, tags


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
    preflight(config, check_teacher_endpoint=False)   # a deployment run with a bad input fails here, in seconds
    t0 = time.perf_counter()
    label, name, run_tags = label_run(config, preset, overrides)
    use_workspace(config)
    logger = get_run_logger()
    run_id = str(get_run_context().flow_run.id)

    def phase(flow_, *args):   # a phase subflow named and tagged after this run, so a long run list ties them up
        with tags(*run_tags):
            return flow_.with_options(flow_run_name=f"{name}-{flow_.name}")(config, *args)

    with run_lock(workspace_of(config).root, on_wait=logger.warning):   # one run at a time on a workspace
        reconcile_dead_runs(config, logger)
        heartbeat = record_run_start(config, run_id, flow_run_id=run_id)
        try:
            out = phase(evaluate, phase(train, phase(prepare, phase(generate))))
            exported = export_stages(config, out.generation, {
                "student": out.student, "steps": out.steps, "token_weights": out.token_weights,
                "difficulty": out.difficulty}) if config.export.enabled else None
        except BaseException:
            record_run_end(config, run_id, None)
            raise
        finally:
            heartbeat.stop()
        summary = record_run_end(config, run_id, out, label, exported["out_dir"] if exported else None)
    write_run_header(config, out, label, run_id, time.perf_counter() - t0)
    publish_results(config, out.evaluation, out.report)   # the run the user started carries the results
    logger.info("results: %s (report %s)", summary.accuracy, out.report)
    return summary
