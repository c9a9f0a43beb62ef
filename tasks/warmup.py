"""Warm-up stage: the student after a few epochs of Std-CoT on the kept rationales.

KPOD reads "the student before distillation" twice: the token weights' answer predictor (§4.1) and the
difficulty scorer (§4.2). A scratch student's random initial weights would say nothing to either, so each reads
the student after `epochs` of Std-CoT instead (`token_weights.predictor_warmup_epochs`,
`difficulty.warmup_epochs`; one shared model when the two are equal; which of them a run has:
`DistillConfig.predictor_warmup_epochs` / `scorer_warmup_epochs`). Distillation itself still starts from the
untrained student.

Input: the untrained `Student`, the teacher's `Generation`. Output: a `Student` (its folder is the last epoch's
checkpoint); with `epochs` 0 the untrained student itself.
"""
from __future__ import annotations

from keystep.config import DistillConfig, TrainConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.stage import cached_output, publish_stage
from tasks.student import Student
from tasks.teacher import Generation
from tasks.training import TrainInputs, run_training

CODE_VERSION = "2"
# How the warm-up runs (not what it learns) comes from the user's train section: a 7B LoRA student warms up
# with the same precision, checkpointing and packing it trains with.
INHERITED = ("device", "precision", "compile", "gradient_checkpointing", "packing", "pack_length", "allow_truncation")


def warmup_lineage(config: DistillConfig, generation: Generation, student: Student, epochs: int) -> Lineage:
    return Lineage("student-warmup", {"epochs": epochs, "device": config.train.device,
                                      "precision": config.train.precision, "lora": config.student.lora},
                   (generation.fp, student.fp), CODE_VERSION)


def warm_up_student(ws: Workspace, config: DistillConfig, generation: Generation, student: Student,
                    epochs: int) -> Student:
    if not epochs:
        return student
    lineage = warmup_lineage(config, generation, student, epochs)
    done = cached_output(ws.catalog(), lineage, Student)
    if done:
        return done
    # its own train section (how it runs inherited from the user's), so `config.train` means one thing everywhere
    warm = config.model_copy(update={"train": TrainConfig(epochs=epochs, seed=1,
                                                          **{k: getattr(config.train, k) for k in INHERITED})})
    trained = run_training(ws, lineage, warm, TrainInputs(generation=generation, student=student))
    out = Student(fp=lineage.fp, model_dir=trained.final_dir, n_params=student.n_params, device=trained.device)
    return publish_stage(ws.catalog(), lineage, out)


# ---- Prefect wrapper ------------------------------------------------------------------------------
from tasks.stage import stage_task, workspace_of  # noqa: E402


@stage_task("student-warmup", warmup_lineage, tags=["gpu"])
def warm_up_task(config: DistillConfig, generation: Generation, student: Student, epochs: int) -> Student:
    return warm_up_student(workspace_of(config), config, generation, student, epochs)
