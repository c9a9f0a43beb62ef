"""Train stage: distil the student on the kept rationales.

Std-CoT: NLL on rationale + answer. KPOD (§4.3-4.4): epoch e reads curriculum stage min(e, T) from its Parquet
shard; the input is the question + the first c_i steps (no loss there), the target the remaining steps + the
answer, and the loss −Σ_j w_j·log P(r_j | ·) − Σ log P(y | ·) with w the learned token weights (§4.1). The
sequences themselves come from tasks/formats.py.

Input: the untrained `Student`, the `Generation` (kept rationales), `TrainConfig` (+ for KPOD: `Steps`,
`TokenWeights`, `Curriculum`; for the key-token format: `TokenWeights`). Output: `Trained`, and
`checkpoints/<fp>/epoch-N/` per epoch (HF model dir + tokenizer + trainer_state.pt + the resolved run config) with
rows in `checkpoints`. A rerun after a kill resumes from the last whole epoch: model, optimizer and scheduler
state are restored and the data order is a function of (seed, epoch), so the result equals an uninterrupted run.

In the style of nanoGPT and torchtune's recipes: `setup` builds everything the loop touches (a `TrainingRun`),
`run_epoch` is one explicit pass, `save_checkpoint` publishes an epoch, `cleanup` frees the device and returns
the output; `run_training` is the loop over them.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from keystep.config import DistillConfig, TrainConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.curriculum import Curriculum, stage_shard
from tasks.formats import IGNORE, encode_rationale, format_target, keytoken_text, kpod_sequence
from tasks.stage import StageOutput, cached_output
from tasks.steps import Steps
from tasks.student import Student, load_student, pick_device
from tasks.teacher import Generation
from tasks.token_weights import TokenWeights, load_weights

CODE_VERSION = "1"

if TYPE_CHECKING:
    import torch


class Trained(StageOutput):
    """The trained student: `final_dir` is the last epoch's checkpoint (an HF model folder)."""
    final_dir: str
    init_dir: str
    epochs: int
    target_format: str
    loss: str
    n_examples: int
    n_truncated: int
    n_unweighted: int | None
    resumed_from_epoch: int
    device: str
    history: list[dict]


# ---- batches and loss ---------------------------------------------------------------------------------
def collate(batch: list[tuple], pad_id: int) -> dict[str, "torch.Tensor"]:
    """(ids, labels[, loss weights]) per sequence -> padded tensors; weights default to 1."""
    import torch

    width = max(len(x[0]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), width))
    for i, (x, y, *w) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
        weights[i, : len(x)] = torch.tensor(w[0]) if w else 1.0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


def weighted_nll(logits: "torch.Tensor", labels: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """Σ_j w_j·(−log P(token_j | tokens_<j)) over labelled tokens / their count. With every w_j = 1 this is the
    usual causal-LM loss (Std-CoT); KPOD passes the learned token weights on rationale tokens, 1 on the answer."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                            ignore_index=IGNORE, reduction="none")
    return (nll * weights[:, 1:]).sum() / (labels[:, 1:] != IGNORE).sum().clamp(min=1)


class KpodData:
    """Per-stage training sequences for KPOD: input = question + first c_i(t) steps, target = the rest."""

    def __init__(self, catalog, tokenizer, config: DistillConfig, rows: list[dict], steps: Steps,
                 token_weights: TokenWeights, curriculum: Curriculum):
        self.tokenizer, self.config, self.rows = tokenizer, config, rows
        self.shards_dir, self.stages = curriculum.shards_dir, curriculum.stages
        self.weights = load_weights(catalog, token_weights)
        self.step_ends: dict[str, list[int]] = {}
        for st in catalog.query("steps_of_rationales", steps_fp=steps.fp):
            self.step_ends.setdefault(st["rationale_id"], []).append(st["char_end"])
        self.n_unweighted = sum(r["rationale_id"] not in self.weights for r in rows)
        self._cache: dict[int, list[tuple]] = {}

    def stage_of(self, epoch: int) -> int:
        return min(epoch, self.stages)

    def sequences(self, epoch: int) -> list[tuple[list[int], list[int], list[float]]]:
        stage = self.stage_of(epoch)
        if stage not in self._cache:
            prefix = stage_shard(self.shards_dir, stage)
            self._cache = {stage: [
                kpod_sequence(self.tokenizer, self.config.teacher, r, self.config.student.max_length,
                              self.step_ends[r["rationale_id"]], prefix.get(r["rationale_id"], 0),
                              self.weights.get(r["rationale_id"]), self.config.train.token_weight_scale)
                for r in self.rows]}
        return self._cache[stage]


TRUNCATION_WARN, TRUNCATION_FAIL = 0.05, 0.20


def check_truncation(n_truncated: int, n: int, max_length: int, allowed: bool, longest: int) -> None:
    """Cut sequences lose their answer (the loss then never sees it): fail above 20% unless allowed; the stage's
    output carries the count, and the task and the report warn above 5%."""
    if n and n_truncated / n > TRUNCATION_FAIL and not allowed:
        raise ValueError(f"config key 'student.max_length': {n_truncated} of {n} training sequences "
                         f"({n_truncated / n:.0%}) are longer than {max_length} tokens (the longest has {longest}); "
                         f"raise student.max_length, or set train.allow_truncation: true to train on them cut")


def last_whole_epoch(ckpt_root: Path) -> int:
    """Highest epoch whose checkpoint was fully written (published by rename), else 0."""
    epochs = [int(p.name.split("-")[1]) for p in ckpt_root.glob("epoch-*") if (p / "trainer_state.pt").exists()]
    return max(epochs, default=0)


# ---- the run --------------------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """Everything the training loop touches, built by `setup`."""
    cfg: TrainConfig
    lineage: Lineage
    catalog: Any
    ckpt_root: Path
    init_dir: str
    run_config: dict
    device: str
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    data: list[tuple]            # (ids, labels[, loss weights]) per sequence
    staged: KpodData | None      # KPOD: the sequences change with the curriculum stage
    epochs: int
    start_epoch: int
    n_truncated: int
    history: list[dict]


def setup(ws: Workspace, lineage: Lineage, cfg: TrainConfig, config: DistillConfig, generation: Generation,
          student: Student, steps: Steps | None = None, token_weights: TokenWeights | None = None,
          curriculum: Curriculum | None = None) -> TrainingRun:
    """Load the student (or the last whole epoch's checkpoint), encode the data, build optimizer and schedule."""
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    catalog, ckpt_root = ws.catalog(), ws.checkpoints_root(lineage.fp)
    device = pick_device(cfg.device)
    rows = catalog.query("kept_rationales", dataset_fp=generation.dataset_fp, teacher_fp=generation.teacher_fp,
                         only_correct=config.teacher.keep_only_correct)
    if not rows:
        raise ValueError("no kept rationales to train on; check the teacher's correctness rate and "
                         "teacher.keep_only_correct")
    if cfg.loss == "kpod" and not (steps and token_weights and curriculum):
        raise ValueError("train.loss 'kpod' needs token weights and a curriculum (run the distill/prepare flow)")
    if cfg.target_format == "label_then_keytokens" and not token_weights:
        raise ValueError("train.target_format 'label_then_keytokens' needs token weights (run the distill/prepare flow)")
    start_epoch = last_whole_epoch(ckpt_root)
    model, tokenizer = load_student(ckpt_root / f"epoch-{start_epoch}" if start_epoch else student.model_dir, device=device)
    key_texts = {}
    if cfg.target_format == "label_then_keytokens":
        by_id = {r["rationale_id"]: r for r in rows}
        key_texts = {k["rationale_id"]: keytoken_text(tokenizer, config.teacher, by_id[k["rationale_id"]],
                                                      k["token_start"], k["keypoints"])
                     for k in catalog.query("token_weights_of", token_weights_fp=token_weights.fp)
                     if k["rationale_id"] in by_id}
    data, n_truncated, longest, max_length = [], 0, 0, config.student.max_length
    for r in rows:
        target = format_target(cfg.target_format, r["text"], r["answer"], config.teacher,
                               key_texts.get(r["rationale_id"], ""), shuffle_seed=r["rationale_id"])
        seq = encode_rationale(tokenizer, config.teacher, r, max_length, target)
        data.append((seq.ids, seq.labels))
        n_truncated, longest = n_truncated + seq.truncated, max(longest, seq.length)
    check_truncation(n_truncated, len(data), max_length, cfg.allow_truncation, longest)
    staged = KpodData(catalog, tokenizer, config, rows, steps, token_weights, curriculum) if cfg.loss == "kpod" else None
    epochs = cfg.epochs
    if cfg.match_cot_tokens and cfg.target_format != "cot_then_label":
        # as many training tokens as `epochs` passes over rationale-then-answer sequences (Mysteries, equal budget)
        cot = sum(len(encode_rationale(tokenizer, config.teacher, r, max_length).ids) for r in rows)
        epochs = max(1, round(cfg.epochs * cot / sum(len(ids) for ids, _ in data)))
    total_steps = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum)) * epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=cfg.min_lr_ratio)
    history = []
    if start_epoch:
        state = torch.load(ckpt_root / f"epoch-{start_epoch}" / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = json.loads((ckpt_root / f"epoch-{start_epoch}" / "metrics.json").read_text())["history"]
    run_config = {**config.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}   # this run's resolved config
    return TrainingRun(cfg, lineage, catalog, ckpt_root, student.model_dir, run_config, device,
                       model, tokenizer, optimizer, scheduler, data, staged, epochs, start_epoch, n_truncated, history)


def run_epoch(run: TrainingRun, epoch: int) -> dict:
    """One pass over the data in a per-epoch order (a resumed run sees the same order); returns its metrics."""
    import torch

    cfg, model, device = run.cfg, run.model, run.device
    autocast_dtype = torch.bfloat16 if device == "cuda" else None
    model.train()
    t0, tokens, supervised, weighted, loss_sum, n_micro = time.perf_counter(), 0, 0, 0.0, 0.0, 0
    if run.staged:
        run.data = run.staged.sequences(epoch)   # curriculum stage min(epoch, T): same examples, other prefixes
    order = list(range(len(run.data)))
    random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
    torch.manual_seed(cfg.seed * 1000 + epoch)
    micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for i, idx in enumerate(micro):
        batch = {k: v.to(device) for k, v in collate([run.data[j] for j in idx], run.tokenizer.pad_token_id).items()}
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = weighted_nll(logits, batch["labels"], batch["weights"])
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
        n_micro += 1
        tokens += int(batch["attention_mask"].sum())
        carries_loss = batch["labels"][:, 1:] != IGNORE          # what the loss sums over (a compute-fair comparison)
        supervised += int(carries_loss.sum())
        weighted += float((batch["weights"][:, 1:] * carries_loss).sum())
        if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(micro):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    return {"epoch": epoch, "stage": run.staged.stage_of(epoch) if run.staged else None,
            "loss": loss_sum / max(n_micro, 1), "tokens": tokens, "supervised_tokens": supervised,
            "weighted_tokens": round(weighted, 1),
            "tokens_per_s": tokens / (time.perf_counter() - t0), "lr": run.scheduler.get_last_lr()[0]}


def save_checkpoint(run: TrainingRun, epoch: int, metrics: dict) -> Path:
    """Write the epoch to a temp dir, then rename it into place (a kill never leaves a half-written epoch)."""
    import torch

    run.history.append(metrics)
    final = run.ckpt_root / f"epoch-{epoch}"
    tmp = temp_dir_for(final)
    run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "epoch": epoch},
               tmp / "trainer_state.pt")
    (tmp / "keystep_config.json").write_text(json.dumps(run.run_config, indent=2))
    (tmp / "metrics.json").write_text(json.dumps({"history": run.history}, indent=2))
    publish_dir(tmp, final)
    with run.catalog.transaction() as con:
        con.execute("delete from checkpoints where train_fp = ? and epoch = ?", [run.lineage.fp, epoch])
        run.catalog.insert(con, "checkpoints", [{"train_fp": run.lineage.fp, "epoch": epoch, "path": str(final),
                                                 "config_json": json.dumps(run.run_config),
                                                 "metrics_json": json.dumps(metrics)}])
    return final


def cleanup(run: TrainingRun) -> Trained:
    """Free the model and optimizer (and the GPU cache); the output names the final checkpoint."""
    import torch

    run.model = run.optimizer = None
    if run.device == "cuda":
        torch.cuda.empty_cache()
    return Trained(fp=run.lineage.fp, final_dir=str(run.ckpt_root / f"epoch-{run.epochs}"), init_dir=run.init_dir,
                   epochs=run.epochs, target_format=run.cfg.target_format, loss=run.cfg.loss, n_examples=len(run.data),
                   n_truncated=run.n_truncated, n_unweighted=run.staged.n_unweighted if run.staged else None,
                   resumed_from_epoch=run.start_epoch, device=run.device, history=run.history)


def run_training(ws: Workspace, lineage: Lineage, cfg: TrainConfig, config: DistillConfig, generation: Generation,
                 student: Student, steps: Steps | None = None, token_weights: TokenWeights | None = None,
                 curriculum: Curriculum | None = None,
                 on_epoch: Callable[[int, int, dict], None] | None = None) -> Trained:
    """setup -> run_epoch / save_checkpoint per epoch (from the last whole one) -> cleanup."""
    run = setup(ws, lineage, cfg, config, generation, student, steps, token_weights, curriculum)
    for epoch in range(run.start_epoch + 1, run.epochs + 1):
        metrics = run_epoch(run, epoch)
        save_checkpoint(run, epoch, metrics)
        if on_epoch:
            on_epoch(epoch, run.epochs, metrics)
    return cleanup(run)


# ---- the stage ------------------------------------------------------------------------------------------
def train_lineage(config: DistillConfig, generation: Generation, student: Student, steps: Steps | None = None,
                  token_weights: TokenWeights | None = None, curriculum: Curriculum | None = None) -> Lineage:
    """Upstream: what training reads — the rationales and the student, for KPOD also steps, token weights and the
    curriculum, for the key-token format the token weights."""
    upstream = [generation.fp, student.fp]
    if config.train.loss == "kpod":
        upstream += [steps.fp, token_weights.fp, curriculum.fp]
    elif config.train.target_format == "label_then_keytokens":
        upstream += [token_weights.fp]
    return Lineage("train", config.train, tuple(upstream), CODE_VERSION)


def train_student(ws: Workspace, config: DistillConfig, generation: Generation, student: Student,
                  steps: Steps | None = None, token_weights: TokenWeights | None = None,
                  curriculum: Curriculum | None = None,
                  on_epoch: Callable[[int, int, dict], None] | None = None) -> Trained:
    lineage = train_lineage(config, generation, student, steps, token_weights, curriculum)
    done = cached_output(ws.catalog(), lineage, Trained)
    if done and Path(done.final_dir).exists():
        return done
    out = run_training(ws, lineage, config.train, config, generation, student, steps, token_weights, curriculum,
                       on_epoch)
    with ws.catalog().transaction() as con:
        ws.catalog().record_stage(con, lineage, out.model_dump())
    return out


# ---- Prefect wrapper ------------------------------------------------------------------------------
from prefect import get_run_logger  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402

from tasks.stage import stage_task, workspace_of  # noqa: E402


@stage_task("train-student", train_lineage, tags=["gpu"])
def train_task(config: DistillConfig, generation: Generation, student: Student, steps: Steps | None = None,
               token_weights: TokenWeights | None = None, curriculum: Curriculum | None = None) -> Trained:
    logger = get_run_logger()
    lineage = train_lineage(config, generation, student, steps, token_weights, curriculum)
    progress = create_progress_artifact(0.0, key="train-progress", description=f"training {lineage.fp}")

    def on_epoch(epoch: int, total: int, metrics: dict) -> None:
        update_progress_artifact(progress, 100.0 * epoch / total)
        logger.info("epoch %d/%d loss %.4f (%.0f tokens/s)", epoch, total, metrics["loss"], metrics["tokens_per_s"])

    out = train_student(workspace_of(config), config, generation, student, steps, token_weights, curriculum, on_epoch)
    update_progress_artifact(progress, 100.0)
    if out.n_truncated > TRUNCATION_WARN * out.n_examples:
        logger.warning("%d of %d training sequences (%.0f%%) were cut at student.max_length=%d: their answers are lost "
                       "to the loss; raise student.max_length", out.n_truncated, out.n_examples,
                       100 * out.n_truncated / out.n_examples, config.student.max_length)
    return out
