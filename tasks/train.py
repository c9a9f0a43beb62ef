"""Train stage: distil the student on the kept rationales (Std-CoT: NLL on rationale + answer).

Input: the student-init model dir, kept rationales (generation output), `TrainConfig`. Output:
`checkpoints/<fp>/epoch-N/` per epoch (HF model dir + tokenizer + trainer_state.pt + the resolved run
config) and rows in `checkpoints`. A rerun after a kill resumes from the last whole epoch: model, optimizer,
scheduler and RNG state are restored, so the result equals an uninterrupted run.

setup -> train -> cleanup inside one call, in the style of nanoGPT: an explicit loop, nothing hidden.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from keystep.config import TeacherConfig, TrainConfig
from storage.fingerprint import fingerprint
from storage.workspace import publish_dir, temp_dir_for
from tasks.student import load_student
from tasks.teacher import format_prompt, training_target

CODE_VERSION = "1"
IGNORE = -100

if TYPE_CHECKING:
    import torch


def pick_device(setting: str) -> str:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'train.device': 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    return "cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def encode_example(tokenizer, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """Token ids of `<bos> prompt target <eos>` and labels that are IGNORE on the prompt (no loss there)."""
    text = prompt + " " + target
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    for tid, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tid)
        labels.append(tid if end > len(prompt) else IGNORE)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, "torch.Tensor"]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def last_whole_epoch(ckpt_root: Path) -> int:
    """Highest epoch whose checkpoint was fully written (published by rename), else 0."""
    epochs = [int(p.name.split("-")[1]) for p in ckpt_root.glob("epoch-*") if (p / "trainer_state.pt").exists()]
    return max(epochs, default=0)


def train_fingerprint(cfg: TrainConfig, student_fp: str, steps_fp: str, generation_fp: str) -> str:
    return fingerprint("train", cfg, [student_fp, steps_fp, generation_fp], CODE_VERSION)


def train_student(catalog, cfg: TrainConfig, teacher_cfg: TeacherConfig, generation: dict, init_dir: str,
                  ckpt_root: Path, fp: str, max_length: int, run_config: dict,
                  on_epoch: Callable[[int, int, dict], None] | None = None) -> dict:
    import torch  # imported here: a cached run of the flow never needs it

    done = catalog.stage_output(fp)
    if done and Path(done["summary"]["final_dir"]).exists():
        return done["summary"]

    # ---- setup ----------------------------------------------------------------------------------------
    device = pick_device(cfg.device)
    autocast_dtype = torch.bfloat16 if device == "cuda" else None
    rows = catalog.query("kept_rationales", dataset_fp=generation["dataset_fp"], teacher_fp=generation["teacher_fp"],
                         only_correct=teacher_cfg.keep_only_correct)
    if not rows:
        raise ValueError("no kept rationales to train on; check the teacher's correctness rate and "
                         "teacher.keep_only_correct")
    start_epoch = last_whole_epoch(ckpt_root)
    model_dir = ckpt_root / f"epoch-{start_epoch}" if start_epoch else Path(init_dir)
    model, tokenizer = load_student(model_dir, device=device)
    data, n_truncated = [], 0
    for r in rows:
        ids, labels, truncated = encode_example(tokenizer, format_prompt(teacher_cfg, r["question"]),
                                                training_target(r["text"], r["answer"], teacher_cfg), max_length)
        data.append((ids, labels))
        n_truncated += truncated
    steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=cfg.min_lr_ratio)
    if start_epoch:
        state = torch.load(ckpt_root / f"epoch-{start_epoch}" / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    history = json.loads((ckpt_root / f"epoch-{start_epoch}" / "metrics.json").read_text())["history"] if start_epoch else []

    # ---- train ------------------------------------------------------------------------------------------
    model.train()
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0, tokens, loss_sum, n_micro = time.perf_counter(), 0, 0.0, 0
        order = list(range(len(data)))
        random.Random(f"{cfg.seed}-{epoch}").shuffle(order)  # per-epoch order: resumes see the same data
        torch.manual_seed(cfg.seed * 1000 + epoch)
        micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for i, idx in enumerate(micro):
            batch = {k: v.to(device) for k, v in collate([data[j] for j in idx], tokenizer.pad_token_id).items()}
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            n_micro += 1
            tokens += int(batch["attention_mask"].sum())
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(micro):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        metrics = {"epoch": epoch, "loss": loss_sum / max(n_micro, 1), "tokens": tokens,
                   "tokens_per_s": tokens / (time.perf_counter() - t0), "lr": scheduler.get_last_lr()[0]}
        history.append(metrics)
        # checkpoint: write to a temp dir, then rename, so a kill never leaves a half-written epoch
        final = ckpt_root / f"epoch-{epoch}"
        tmp = temp_dir_for(final)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}, tmp / "trainer_state.pt")
        (tmp / "keystep_config.json").write_text(json.dumps(run_config, indent=2, default=str))
        (tmp / "metrics.json").write_text(json.dumps({"history": history}, indent=2))
        publish_dir(tmp, final)
        with catalog.transaction() as con:
            con.execute("delete from checkpoints where train_fp = ? and epoch = ?", [fp, epoch])
            catalog.insert(con, "checkpoints", [{"train_fp": fp, "epoch": epoch, "path": str(final),
                                                "config_json": json.dumps(run_config, default=str),
                                                "metrics_json": json.dumps(metrics)}])
        if on_epoch:
            on_epoch(epoch, cfg.epochs, metrics)

    # ---- cleanup ----------------------------------------------------------------------------------------
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    summary = {"train_fp": fp, "final_dir": str(ckpt_root / f"epoch-{cfg.epochs}"), "init_dir": str(init_dir),
               "n_examples": len(data), "n_truncated": n_truncated, "resumed_from_epoch": start_epoch,
               "device": device, "history": history}
    with catalog.transaction() as con:
        catalog.record_stage(con, fp, stage="train", code_version=CODE_VERSION, config=cfg,
                             upstream=[generation["fingerprint"]], summary=summary)
    return summary


# ---- Prefect wrapper ------------------------------------------------------------------------------
from prefect import get_run_logger  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402

from storage.workspace import Workspace  # noqa: E402
from tasks.prefect_stage import stage_task  # noqa: E402


@stage_task("train-student", tags=["gpu"])
def train_task(workspace: str, cfg: TrainConfig, teacher_cfg: TeacherConfig, generation: dict, student: dict,
               fp: str, max_length: int, run_config: dict) -> dict:
    ws = Workspace(workspace)
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="train-progress", description=f"training {fp}")

    def on_epoch(epoch: int, total: int, metrics: dict) -> None:
        update_progress_artifact(progress, 100.0 * epoch / total)
        logger.info("epoch %d/%d loss %.4f (%.0f tokens/s)", epoch, total, metrics["loss"], metrics["tokens_per_s"])

    summary = train_student(ws.catalog(), cfg, teacher_cfg, generation, student["model_dir"], ws.checkpoints_root(fp),
                            fp, max_length, run_config, on_epoch=on_epoch)
    update_progress_artifact(progress, 100.0)
    return summary
