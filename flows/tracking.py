"""A `distill` run's bookkeeping around its DAG (the run's outputs: flows/phases.py's `EvaluatePhase`): what the UI
shows of it (name, tags, the resolved config as its parameters), its row in table `runs`
(running with a heartbeat, then completed or failed; dead runs reconciled), the workspace's run lock, and its
report's header and results artifact. `tracked_run` wraps it all so flows/distill.py's body is the stage calls.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import get_client, get_run_logger, tags
from prefect.context import get_run_context
from prefect.states import Crashed
from pydantic import BaseModel

from flows.phases import EvaluatePhase
from flows.preflight import preflight
from keystep.config import DistillConfig
from storage.runs import Heartbeat, reconcile, run_lock, start_run
from tasks.evaluate import publish_results, run_header, teacher_usage
from tasks.stage import workspace_of

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
    loss: str | None = None       # train.loss (the headline compares with the previous run of the same preset and loss)
    export: str | None = None     # the dataset folder, when export.enabled



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
    previous = catalog.query("previous_run", run_id=run_id, label=label, loss=config.train.loss)
    teacher = teacher_usage(out.generation, cached=catalog.query("stage_before_run", fingerprint=out.generation.fp,
                                                                 run_id=run_id)[0]["before"])
    header = run_header(label, config, catalog.query("latest_results", eval_fp=out.evaluation.fp),
                        [out.train_dataset, *out.eval_datasets], out.trained, out.student.n_params, wall_s,
                        previous[0] if previous else None, teacher, out.teacher_scores)
    report = Path(out.report)
    report.write_text(header + report.read_text())


def record_run_end(config: DistillConfig, run_id: str, out: EvaluatePhase | None, label: str | None = None,
                   export: str | None = None) -> RunSummary | None:
    """The run's row in table `runs`: completed with its summary, or failed (`out` None)."""
    summary = None if out is None else RunSummary(
        run_id=run_id, label=label, workspace=str(workspace_of(config).root), report=out.report,
        accuracy=out.evaluation.accuracy, eval_fp=out.evaluation.fp, train_fp=out.trained.fp,
        final_dir=out.trained.final_dir, export=export, loss=config.train.loss)
    workspace_of(config).catalog().query("run_finished", run_id=run_id, status="failed" if out is None else "completed",
                                         summary_json=summary.model_dump_json() if summary else None)
    return summary


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


class TrackedRun:
    """One `distill` run while it runs: `phase` runs a phase subflow named and tagged after it; `finished` records
    its outputs (summary in table `runs`)."""

    def __init__(self, config: DistillConfig, run_id: str, label: str, name: str, run_tags: list[str]):
        self.config, self.run_id, self.label, self.name, self.tags = config, run_id, label, name, run_tags
        self.summary: RunSummary | None = None
        self.out: EvaluatePhase | None = None

    def phase(self, flow_, *args, **kwargs):
        with tags(*self.tags):   # so a long run list ties the phases to their run
            return flow_.with_options(flow_run_name=f"{self.name}-{flow_.name}")(self.config, *args, **kwargs)

    def finished(self, out: EvaluatePhase, exported: dict[str, Any] | None = None) -> None:
        """The run's outputs (and the export stage's, when it ran): recorded as completed in table `runs`."""
        self.out = out
        self.summary = record_run_end(self.config, self.run_id, out, self.label, exported["out_dir"] if exported else None)


@contextmanager
def tracked_run(config: DistillConfig, preset: str | None, overrides: dict[str, Any] | None) -> Iterator[TrackedRun]:
    """Check the inputs (a deployment run with a bad input fails here, in seconds), label the run, hold the
    workspace's run lock, keep its row in table `runs` alive; after the body: the report's header and the results
    artifact on the run the user started. A body that raises leaves the run 'failed'."""
    preflight(config, check_teacher_endpoint=False)
    t0 = time.perf_counter()
    label, name, run_tags = label_run(config, preset, overrides)
    logger = get_run_logger()
    run = TrackedRun(config, str(get_run_context().flow_run.id), label, name, run_tags)
    with run_lock(workspace_of(config).root, on_wait=logger.warning):   # one run at a time on a workspace
        reconcile_dead_runs(config, logger)
        heartbeat = record_run_start(config, run.run_id, flow_run_id=run.run_id)
        try:
            yield run
            if run.summary is None:
                raise RuntimeError("tracked_run: the run's body ended without calling finished()")
        except BaseException:
            record_run_end(config, run.run_id, None)
            raise
        finally:
            heartbeat.stop()
    write_run_header(config, run.out, label, run.run_id, time.perf_counter() - t0)
    publish_results(config, run.out.evaluation, run.out.report)
    logger.info("results: %s (report %s)", run.summary.accuracy, run.out.report)
