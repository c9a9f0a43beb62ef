"""Train stage: distil the student on the kept rationales (the loop itself: tasks/training.py).

Input: `TrainInputs` — the untrained `Student`, the `Generation` (kept rationales), for KPOD also `Steps`,
`TokenWeights` and the `Curriculum`, for the key-token format the `TokenWeights` — and the config's `train` section.
Output: `Trained`, and `checkpoints/<fp>/epoch-N/` per epoch (HF model dir + tokenizer + trainer_state.pt + the
resolved run config) with rows in `checkpoints`; a rerun after a kill resumes from the last whole epoch.
With `train.num_processes` > 1 the task starts torchrun on tasks/train_worker.py (tasks/parallel.py) and reads back
rank 0's output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from keystep.config import DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.parallel import launch
from tasks.stage import Stage
from tasks.student import pick_device
from tasks.training import TRUNCATION_WARN, TrainInputs, Trained, run_training

CODE_VERSION = "2"   # 2: packed batches, loss normalised per optimizer step

# ---- the stage ------------------------------------------------------------------------------------------
def train_lineage(config: DistillConfig, inputs: TrainInputs) -> Lineage:
    """Upstream: what training reads — the rationales and the student, for KPOD also steps, token weights and the
    curriculum, for the key-token format the token weights."""
    i = inputs
    upstream = [i.generation.fp, i.student.fp]
    if config.train.uses_kpod:
        upstream += [i.steps.fp, i.token_weights.fp, i.curriculum.fp]
    elif config.train.target_format == "label_then_keytokens":
        upstream += [i.token_weights.fp]
    if config.train.uses_teacher_scores:
        upstream += [i.teacher_scores.fp]
    # LoRA adapters are trained here, so their settings belong to this stage (not to the student's)
    what = config.train if config.student.lora is None else {"train": config.train, "lora": config.student.lora}
    return Lineage("train", what, tuple(upstream), CODE_VERSION)


def train_student(ws: Workspace, config: DistillConfig, inputs: TrainInputs, lineage: Lineage,
                  on_epoch: Callable[[int, int, dict], None] | None = None,
                  log: Callable[[str], None] = print) -> Trained:
    if config.train.num_processes > 1:
        return launch_training(ws, config, inputs, lineage, on_epoch, log)
    return run_training(ws, lineage, config, inputs, on_epoch)


TRAIN = Stage("train", TrainInputs, Trained, train_lineage, train_student,
              still_valid=lambda config, done: Path(done.final_dir).exists(), tags=["gpu"])


# ---- several processes (tasks/parallel.py) ---------------------------------------------------------------
def launch_training(ws: Workspace, config: DistillConfig, inputs: TrainInputs, lineage: Lineage,
                    on_epoch: Callable[[int, int, dict], None] | None = None,
                    log: Callable[[str], None] = print) -> Trained:
    """`train.num_processes` ranks under torchrun, each running tasks/train_worker.py; their output goes to `log`,
    their epoch lines to `on_epoch`."""
    from tasks.train_worker import EPOCH_LINE, worker_spec

    def relay(line: str) -> None:
        if line.startswith(EPOCH_LINE) and on_epoch:
            try:
                epoch = json.loads(line[len(EPOCH_LINE):])
            except ValueError:   # another rank's output got into the line: progress is cosmetic, keep the text
                log(line)
                return
            on_epoch(*epoch)
        else:
            log(line)

    out = launch("tasks.train_worker", worker_spec(ws, config, inputs, lineage), config.train.num_processes,
                 pick_device(config.train.device), relay)
    return Trained.model_validate(out)


# ---- in Prefect: progress and the truncation warning ---------------------------------------------------------
@TRAIN.in_prefect
def _train_in_prefect(run, config: DistillConfig, inputs: TrainInputs, lineage: Lineage) -> Trained:
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="train-progress", description=f"training {lineage.fp}")

    def on_epoch(epoch: int, total: int, metrics: dict) -> None:
        update_progress_artifact(progress, 100.0 * epoch / total)
        logger.info("epoch %d/%d loss %.4f (%.0f tokens/s)", epoch, total, metrics["loss"], metrics["tokens_per_s"])
        if "on_policy_share" in metrics:
            from tasks.on_policy import epoch_line
            logger.info("epoch %d: %s", epoch, epoch_line(metrics))

    out = run(on_epoch=on_epoch, log=logger.info)
    update_progress_artifact(progress, 100.0)
    if config.train.loss == "on_policy":
        on_policy_artifacts(config, out)
    if out.n_truncated > TRUNCATION_WARN * out.n_examples:
        logger.warning("%d of %d training sequences (%.0f%%) were cut at student.max_length=%d: their answers are lost "
                       "to the loss; raise student.max_length", out.n_truncated, out.n_examples,
                       100 * out.n_truncated / out.n_examples, config.student.max_length)
    return out


def on_policy_artifacts(config: DistillConfig, out: Trained) -> None:
    """on_policy: per epoch, the share of on-policy steps, the sample accuracy, the reverse KL and the time split, as
    a table and as a report with its plot (the PNG embedded: the UI cannot reach the workspace)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.on_policy import on_policy_markdown, on_policy_table
    from tasks.stage import artifact_markdown, workspace_of

    create_table_artifact(key="on-policy", table=on_policy_table(out.history),
                          description=f"on-policy distillation per epoch ({out.fp})")
    folder = workspace_of(config).root / "reports" / f"on-policy-{out.fp}"
    create_markdown_artifact(key="on-policy-report", markdown=artifact_markdown(on_policy_markdown(out.history, folder),
                                                                                folder),
                             description=f"on-policy distillation ({out.fp}); samples: on-policy/{out.fp}/")
