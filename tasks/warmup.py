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

from pydantic import Field

from keystep.config import DistillConfig, TrainConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.stage import Stage, StageInputs
from tasks.student import Student
from tasks.teacher import Generation
from tasks.training import TrainInputs, run_training

CODE_VERSION = "2"
# How the warm-up runs (not what it learns) comes from the user's train section: a 7B LoRA student warms up
# with the same precision, checkpointing and packing it trains with.
INHERITED = ("device", "precision", "compile", "gradient_checkpointing", "packing", "pack_length", "allow_truncation")


class WarmupInputs(StageInputs):
    """The untrained student, the rationales it warms up on, and for how many epochs."""
    generation: Generation
    student: Student
    epochs: int = Field(ge=1, description="epochs of Std-CoT (0 is the untrained student itself: no stage runs)")


def warmup_lineage(config: DistillConfig, inputs: WarmupInputs) -> Lineage:
    return Lineage("student-warmup", {"epochs": inputs.epochs, "device": config.train.device,
                                      "precision": config.train.precision, "lora": config.student.lora},
                   (inputs.generation.fp, inputs.student.fp), CODE_VERSION)


def warm_up(ws: Workspace, config: DistillConfig, inputs: WarmupInputs, lineage: Lineage) -> Student:
    # its own train section (how it runs inherited from the user's), so `config.train` means one thing everywhere
    warm = config.model_copy(update={"train": TrainConfig(epochs=inputs.epochs, seed=1,
                                                          **{k: getattr(config.train, k) for k in INHERITED})})
    trained = run_training(ws, lineage, warm, TrainInputs(generation=inputs.generation, student=inputs.student))
    return Student(fp=lineage.fp, model_dir=trained.final_dir, n_params=inputs.student.n_params, device=trained.device)


WARMUP = Stage("student-warmup", WarmupInputs, Student, warmup_lineage, warm_up, tags=["gpu"])


def warm_up_student(ws: Workspace, config: DistillConfig, generation: Generation, student: Student,
                    epochs: int) -> Student:
    """The student KPOD's predictor or scorer reads, outside a flow: warmed up for `epochs`, or itself when 0."""
    return WARMUP.run(ws, config, WarmupInputs(
        generation=generation, student=student, epochs=epochs)) if epochs else student
