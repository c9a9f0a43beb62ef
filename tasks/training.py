"""The training loop: what the train stage (tasks/train.py), the warm-up (tasks/warmup.py) and every torchrun rank
(tasks/train_worker.py) run. Plain PyTorch, no Prefect.

Std-CoT: NLL on rationale + answer. KPOD (§4.3-4.4): epoch e reads curriculum stage min(e, T) from its Parquet
shard; the input is the question + the first c_i steps (no loss there), the target the remaining steps + the
answer, and the loss −Σ_j w_j·log P(r_j | ·) − Σ log P(y | ·) with w the learned token weights (§4.1). kd: each
token's NLL mixed with the KL to the teacher's stored top-k (`kd_loss_sum`); kpod_kd: KPOD's stages and weights with
kd's per-token mixture. on_policy (GKD): after `train.on_policy.sft_epochs` epochs of Std-CoT, a share λ of the
steps trains on the student's own samples, scored by the teacher as they are drawn (tasks/on_policy.py), every step
on the generalized JSD to the teacher's top-k. The sequences themselves come from tasks/formats.py (`Sequence`).

In the style of nanoGPT and torchtune's recipes: `setup` builds everything the loop touches (a `LoopState`) from
small units, each given one config section — `_setup_model` (train + student), `_setup_data` (train), `_setup_schedule`
(train) —, `run_epoch` is one explicit pass, `save_checkpoint` publishes an epoch, `cleanup` frees the device and
returns the output; `run_training` is the loop over them. `config.train` is the one meaning of the training settings:
the warm-up passes a config whose train section is its own. Batches are packed rows (tasks/packing.py); a step's
loss is its supervised tokens' summed loss over their count, so packing, micro-batching and the number of processes
(tasks/parallel.py) leave the gradient unchanged. A rerun after a kill resumes from the last whole epoch: model,
optimizer and scheduler state are restored and the data order is a function of (seed, epoch).
With `student.lora` an epoch's checkpoint is the adapter; the last one is also merged (`final_dir`).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from keystep.config import DistillConfig, TeacherConfig, TrainConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.curriculum import Curriculum, curriculum_shard
from tasks.formats import (IGNORE, Sequence, encode_rationale, format_target, keytoken_text, kpod_sequence,
                           standalone_tokenizer)
from tasks.on_policy import OnPolicy, generalized_jsd_sum
from tasks.packing import collate, collate_packed, model_inputs
from tasks.parallel import Dist, full_state, load_optimizer, no_grad_sync, resync, unwrap, wrap
from tasks.stage import StageInputs, StageOutput, kept_rationales
from tasks.steps import Steps
from tasks.student import Student, build_model, merge_adapter, pick_device, resolve_precision
from tasks.teacher import Generation
from tasks.teacher_scores import TeacherScores, teacher_topk
from tasks.token_weights import TokenWeights, load_weights

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


class TrainInputs(StageInputs):
    """What training reads: the kept rationales and the student; for KPOD also the steps, token weights and the
    curriculum; for the key-token format the token weights; for logit distillation the teacher's scores."""
    generation: Generation
    student: Student
    steps: Steps | None = None
    token_weights: TokenWeights | None = None
    curriculum: Curriculum | None = None
    teacher_scores: TeacherScores | None = None


# ---- batches and loss ---------------------------------------------------------------------------------
def weighted_nll_sum(logits: "torch.Tensor", labels: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """Σ_j w_j·(−log P(token_j | tokens_<j)) over labelled tokens. With every w_j = 1 this is the usual causal-LM
    loss (Std-CoT); KPOD passes the learned token weights on rationale tokens, 1 on the answer (§4.3)."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                            ignore_index=IGNORE, reduction="none")
    return (nll * weights[:, 1:]).sum()


def kd_loss_sum(logits: "torch.Tensor", labels: "torch.Tensor", weights: "torch.Tensor", teacher_ids: "torch.Tensor",
                teacher_logprobs: "torch.Tensor", alpha: float, temperature: float) -> "torch.Tensor":
    """Σ_j w_j·[(1 − α)·(−log p_S(y_j)) + α·τ²·Σ_{v ∈ top-k} p̃_T(v)·(log p̃_T(v) − log p_S^τ(v))] over labelled
    tokens j: p̃_T = softmax(teacher top-k log-probabilities / τ), the teacher renormalised over its k tokens (the
    tail dropped); p_S^τ = softmax(student logits / τ) over the whole vocabulary (README: Logit distillation). With
    α = 0 it is `weighted_nll_sum`. w_j: 1 (kd), or KPOD's learned token weight (kpod_kd: KPOD over the teacher's
    distribution, the weight multiplying the token's KL as it multiplies its NLL)."""
    import torch

    z, y = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(z.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    t_lp = torch.log_softmax(teacher_logprobs[:, 1:].float() / temperature, dim=-1)
    s_lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, teacher_ids[:, 1:])
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    per_token = (1 - alpha) * nll + alpha * temperature ** 2 * kl
    return (per_token * weights[:, 1:] * (y != IGNORE)).sum()


def token_loss_sum(logits: "torch.Tensor", batch: dict, cfg: TrainConfig) -> "torch.Tensor":
    """The step's summed token loss for train.loss: GKD's divergence, KD's mixture, or the (weighted) NLL."""
    if cfg.loss == "on_policy":
        return generalized_jsd_sum(logits, batch["labels"], batch["weights"], batch["teacher_ids"],
                                   batch["teacher_logprobs"], cfg.on_policy.beta)
    if cfg.uses_teacher_scores:
        return kd_loss_sum(logits, batch["labels"], batch["weights"], batch["teacher_ids"], batch["teacher_logprobs"],
                           cfg.kd.alpha, cfg.kd.temperature)
    return weighted_nll_sum(logits, batch["labels"], batch["weights"])


def weighted_nll(logits: "torch.Tensor", labels: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """`weighted_nll_sum` / the number of labelled tokens."""
    return weighted_nll_sum(logits, labels, weights) / (labels[:, 1:] != IGNORE).sum().clamp(min=1)


def micro_batches(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches (sequence indices) in a per-(seed, epoch) order, so a resumed run and every rank
    see the same: batch_size sequences each, or with tokens_per_batch as many as fit that many tokens."""
    order = list(range(len(lengths)))
    random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
    if cfg.tokens_per_batch is None:
        return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    batches, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > cfg.tokens_per_batch:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + [current] if current else batches


def optimizer_steps(data: list[Sequence], cfg: TrainConfig, epoch: int) -> list[list[list[int]]]:
    """Micro-batches grouped grad_accum at a time: one group per optimizer step."""
    micro = micro_batches([len(s.ids) for s in data], cfg, epoch)
    return [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]


class CurriculumSequences:
    """KPOD's training sequences per curriculum stage: input = question + first c_i(t) steps, target = the rest."""

    def __init__(self, catalog, tokenizer, teacher: TeacherConfig, train: TrainConfig, max_length: int, rows: list[dict],
                 steps: Steps, token_weights: TokenWeights, curriculum: Curriculum):
        """`teacher`: the prompt and answer templates; `train`: the loss's token-weight scale and floor."""
        self.tokenizer, self.teacher, self.train, self.max_length, self.rows = tokenizer, teacher, train, max_length, rows
        self.shards_dir, self.stages = curriculum.shards_dir, curriculum.stages
        self.weights = load_weights(catalog, token_weights)
        self.step_char_ends: dict[str, list[int]] = {}
        for st in catalog.query("steps_of_rationales", steps_fp=steps.fp):
            self.step_char_ends.setdefault(st["rationale_id"], []).append(st["char_end"])
        self.n_unweighted = sum(r["rationale_id"] not in self.weights for r in rows)
        self._cache: dict[int, list[Sequence]] = {}
        self.teacher_topk: dict | None = None    # kpod_kd: rationale id -> the teacher's top-k rows

    def curriculum_stage(self, epoch: int) -> int:
        """The curriculum stage epoch `epoch` trains on: from stage T on, whole rationales (§4.3)."""
        return min(epoch, self.stages)

    def sequences(self, epoch: int) -> list[Sequence]:
        stage = self.curriculum_stage(epoch)
        if stage not in self._cache:
            prefix = curriculum_shard(self.shards_dir, stage)
            self._cache = {stage: [
                kpod_sequence(self.tokenizer, self.teacher, r, self.max_length,
                              self.step_char_ends[r["rationale_id"]], prefix.get(r["rationale_id"], 0),
                              self.weights.get(r["rationale_id"]), self.train.token_weight_scale,
                              self.train.token_weight_floor)
                for r in self.rows]}
            if self.teacher_topk:
                with_teacher_topk(self._cache[stage], self.rows, self.teacher_topk)
        return self._cache[stage]


def with_teacher_topk(data: list[Sequence], rows: list[dict], topk: dict) -> None:
    """Each row's sequence given the teacher's top-k rows for its tokens (`Sequence.teacher_topk`), cut as it is."""
    for seq, r in zip(data, rows):
        seq.teacher_topk = tuple(a[:len(seq.ids)] for a in topk[r["rationale_id"]])


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


def build_optimizer(model, cfg: TrainConfig, device: str):
    """AdamW over the trainable weights (no decay on norms and biases), fused into one kernel where torch has it."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    fused = device.startswith("cuda") or device == "cpu"
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


# ---- the run --------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class LoopState:
    """Everything the training loop touches, built by `setup`."""
    config: DistillConfig        # the run's resolved config; `config.train` is its training settings
    lineage: Lineage
    catalog: Any
    ckpt_root: Path
    init_dir: str
    device: str
    precision: str
    pack_length: int
    dist: Dist
    model: Any                   # possibly wrapped (DDP / FSDP / compiled)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    data: list[Sequence]         # this epoch's sequences
    staged: CurriculumSequences | None   # KPOD: the sequences change with the curriculum stage
    epochs: int
    start_epoch: int
    n_truncated: int
    history: list[dict]
    on_policy: OnPolicy | None = None    # on_policy: the student's samples and their teacher scores

    @property
    def cfg(self) -> TrainConfig:
        return self.config.train


def _setup_model(config: DistillConfig, student: Student, device: str, resume_dir: Path | None):
    """(model, tokenizer): the student or the epoch to resume, in train.precision, with student.lora's adapters."""
    return build_model(config.train, config.student.lora, student, device, resume_dir)


def _setup_data(cfg: TrainConfig, teacher: TeacherConfig, max_length: int, catalog, tokenizer, rows: list[dict],
                inputs: TrainInputs) -> tuple[list[Sequence], int, CurriculumSequences | None, int]:
    """The train section's target format over the kept rows, in the teacher's prompt and templates, cut at
    `max_length` (student.max_length): (sequences, truncated, KPOD's per-stage sequences, epochs — more for a
    shorter format with train.match_cot_tokens)."""
    key_texts = {}
    if cfg.target_format == "label_then_keytokens":
        by_id = {r["rationale_id"]: r for r in rows}
        key_texts = {k["rationale_id"]: keytoken_text(tokenizer, teacher, by_id[k["rationale_id"]],
                                                      k["token_start"], k["keypoints"])
                     for k in catalog.query("token_weights_of", token_weights_fp=inputs.token_weights.fp)
                     if k["rationale_id"] in by_id}
    data, n_truncated, longest = [], 0, 0
    for r in rows:
        target = format_target(cfg.target_format, r["text"], r["answer"], teacher,
                               key_texts.get(r["rationale_id"], ""), shuffle_seed=r["rationale_id"])
        seq = encode_rationale(tokenizer, teacher, r, max_length, target)
        data.append(seq)
        n_truncated, longest = n_truncated + seq.truncated, max(longest, seq.length)
    check_truncation(n_truncated, len(data), max_length, cfg.allow_truncation, longest)
    staged = (CurriculumSequences(catalog, tokenizer, teacher, cfg, max_length, rows, inputs.steps,
                                  inputs.token_weights, inputs.curriculum) if cfg.uses_kpod else None)
    epochs = cfg.epochs
    if cfg.match_cot_tokens and cfg.target_format != "cot_then_label":
        # as many training tokens as `epochs` passes over rationale-then-answer sequences (Mysteries, equal budget)
        cot = sum(len(encode_rationale(tokenizer, teacher, r, max_length).ids) for r in rows)
        epochs = max(1, round(cfg.epochs * cot / sum(len(s.ids) for s in data)))
    return data, n_truncated, staged, epochs


def _setup_schedule(cfg: TrainConfig, model, device: str, data: list[Sequence], staged: CurriculumSequences | None,
                    epochs: int):
    """AdamW and its warm-up + cosine schedule over the run's optimizer steps."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if cfg.tokens_per_batch is None:
        total_steps = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum)) * epochs
    else:   # the step count depends on the sequences' lengths, which for KPOD change with the stage
        total_steps = sum(len(optimizer_steps(staged.sequences(e) if staged else data, cfg, e))
                          for e in range(1, epochs + 1))
    optimizer = build_optimizer(model, cfg, device)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=cfg.min_lr_ratio)
    return optimizer, scheduler


def setup(ws: Workspace, lineage: Lineage, config: DistillConfig, inputs: TrainInputs) -> LoopState:
    """Load the student (or the last whole epoch's checkpoint), encode the data, build optimizer and schedule."""
    import torch

    cfg, catalog, ckpt_root = config.train, ws.catalog(), ws.checkpoints_root(lineage.fp)
    rows = kept_rationales(catalog, config, inputs.generation)
    if not rows:
        raise ValueError("no kept rationales to train on; check the teacher's correctness rate and "
                         "teacher.keep_only_correct")
    if cfg.uses_kpod and not (inputs.steps and inputs.token_weights and inputs.curriculum):
        raise ValueError(f"train.loss '{cfg.loss}' needs token weights and a curriculum (run the distill/prepare flow)")
    if cfg.uses_teacher_scores and not inputs.teacher_scores:
        raise ValueError(f"train.loss '{cfg.loss}' needs the teacher's scores (set teacher_scores.model; the prepare phase "
                         "computes them)")
    if cfg.target_format == "label_then_keytokens" and not inputs.token_weights:
        raise ValueError("train.target_format 'label_then_keytokens' needs token weights (run the distill/prepare flow)")
    dist = Dist.from_env(pick_device(cfg.device))
    device = dist.device(pick_device(cfg.device))   # a rank's own GPU under torchrun
    start_epoch = last_whole_epoch(ckpt_root)
    model, tokenizer = _setup_model(config, inputs.student, device,
                                    ckpt_root / f"epoch-{start_epoch}" if start_epoch else None)
    data, n_truncated, staged, epochs = _setup_data(cfg, config.teacher, config.student.max_length, catalog, tokenizer,
                                                    rows, inputs)
    if cfg.uses_teacher_scores:   # the teacher's rows, cut where the sequence is (a KPOD stage's too: same ids)
        topk = teacher_topk(ws, config, tokenizer, rows, inputs.teacher_scores)
        with_teacher_topk(data, rows, topk)
        if staged:
            staged.teacher_topk = topk
    model = wrap(model, dist, cfg.strategy)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.startswith("cuda")):
        model = torch.compile(model)
    optimizer, scheduler = _setup_schedule(cfg, model, device, data, staged, epochs)
    on_policy = OnPolicy(ws, config, lineage.fp, tokenizer, rows, device) if cfg.loss == "on_policy" else None
    history = []
    if start_epoch:
        state = torch.load(ckpt_root / f"epoch-{start_epoch}" / "trainer_state.pt", weights_only=False)
        load_optimizer(model, optimizer, state["optimizer"], dist)
        scheduler.load_state_dict(state["scheduler"])
        history = json.loads((ckpt_root / f"epoch-{start_epoch}" / "metrics.json").read_text())["history"]
    return LoopState(config=config, lineage=lineage, catalog=catalog, ckpt_root=ckpt_root,
                     init_dir=inputs.student.model_dir, device=device, precision=resolve_precision(cfg.precision, device),
                     pack_length=cfg.pack_length or 2 * config.student.max_length, dist=dist, model=model,
                     tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, data=data, staged=staged,
                     epochs=epochs, start_epoch=start_epoch, n_truncated=n_truncated, history=history,
                     on_policy=on_policy)


def run_epoch(run: LoopState, epoch: int) -> dict:
    """One pass over the data in a per-epoch order (a resumed run sees the same order); returns its metrics.
    A step's loss is Σ over its supervised tokens / their count, whatever the packing, micro-batching or number
    of processes (each rank sums its share; DDP/FSDP average the gradients, hence the × world)."""
    import torch

    cfg, model, dist = run.cfg, run.model, run.dist
    device_type = torch.device(run.device).type
    autocast = run.precision == "bf16-mixed"
    model.train()
    t0 = time.perf_counter()
    # KPOD: curriculum stage min(epoch, T): the same examples, other prefixes
    data = run.data = run.staged.sequences(epoch) if run.staged else run.data
    torch.manual_seed(cfg.seed * 1000 + epoch)
    totals = torch.zeros(4, dtype=torch.float64)   # tokens, supervised tokens, weighted tokens, Σ step losses
    groups = optimizer_steps(data, cfg, epoch)
    loss_total = torch.zeros((), device=run.device)
    supervised = run.on_policy is not None and run.on_policy.supervised_epoch(epoch)   # on_policy's SFT epochs
    for step, group in enumerate(groups):
        # GKD: with probability λ the step's questions answered by the student's own samples, scored by the teacher
        sampled = run.on_policy is not None and run.on_policy.is_on_policy(epoch, step)
        seq_of = run.on_policy.sequences(model, group, epoch, step).__getitem__ if sampled else data.__getitem__
        n_labelled = max(1, sum(seq_of(j).supervised for idx in group for j in idx))   # the same on every rank
        step_loss = torch.zeros((), device=run.device)   # this rank's share of the step's mean loss
        for k, idx in enumerate(group):
            share = idx[dist.rank::dist.world]
            seqs = [seq_of(j) for j in share or idx[:1]]   # a rank without a share runs one sequence with no loss
            batch = (collate_packed(seqs, run.tokenizer.pad_token_id, run.pack_length) if cfg.packing
                     else collate(seqs, run.tokenizer.pad_token_id))
            if share:
                carries_loss = batch["labels"][:, 1:] != IGNORE      # what the loss sums over (a compute-fair comparison)
                totals += torch.tensor([sum(len(s.ids) for s in seqs), int(carries_loss.sum()),
                                        float((batch["weights"][:, 1:] * carries_loss).sum()), 0.0], dtype=torch.float64)
            else:
                batch["weights"].zero_()
            batch = {key: v.to(run.device, non_blocking=True) for key, v in batch.items()}
            last = k + 1 == len(group)
            if last:
                resync(model, dist)
            with no_grad_sync(model, dist, last):
                with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(**model_inputs(batch)).logits
                nll = (weighted_nll_sum(logits, batch["labels"], batch["weights"]) if supervised
                       else token_loss_sum(logits, batch, cfg))
                if sampled:
                    run.on_policy.add_divergence(logits, batch)
                (nll * dist.world / n_labelled).backward()
            step_loss += nll.detach() / n_labelled
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss_total += step_loss
    totals[3] = float(loss_total)   # one device sync per epoch
    tokens, supervised, weighted, loss_sum = dist.sum(totals.tolist())
    figures = run.on_policy.finish_epoch(epoch, time.perf_counter() - t0) if run.on_policy else {}
    return {**figures, "epoch": epoch, "stage": run.staged.curriculum_stage(epoch) if run.staged else None,
            "loss": loss_sum / max(len(groups), 1), "tokens": int(tokens), "supervised_tokens": int(supervised),
            "weighted_tokens": round(weighted, 1),
            "tokens_per_s": tokens / (time.perf_counter() - t0), "lr": run.scheduler.get_last_lr()[0]}


def save_checkpoint(run: LoopState, epoch: int, metrics: dict) -> Path:
    """Write the epoch to a temp dir, then rename it into place (a kill never leaves a half-written epoch). Every
    rank gathers (FSDP); rank 0 writes. With LoRA the folder holds the adapter (peft format) on the student."""
    import torch

    run.history.append(metrics)
    final = run.ckpt_root / f"epoch-{epoch}"
    model_state, optimizer_state = full_state(run.model, run.optimizer, run.dist)
    run_config = run.config.model_dump(mode="json")   # the run's resolved config, in every checkpoint
    if run.dist.main:
        tmp = temp_dir_for(final)
        unwrap(run.model).save_pretrained(tmp, state_dict=model_state)
        standalone_tokenizer(run.tokenizer, getattr(unwrap(run.model).config, "max_position_embeddings", None)).save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(), "epoch": epoch},
                   tmp / "trainer_state.pt")
        (tmp / "keystep_config.json").write_text(json.dumps(run_config, indent=2))
        (tmp / "metrics.json").write_text(json.dumps({"history": run.history}, indent=2))
        publish_dir(tmp, final)
        with run.catalog.transaction() as con:
            con.execute("delete from checkpoints where train_fp = ? and epoch = ?", [run.lineage.fp, epoch])
            run.catalog.insert(con, "checkpoints", [{"train_fp": run.lineage.fp, "epoch": epoch, "path": str(final),
                                                     "config_json": json.dumps(run_config),
                                                     "metrics_json": json.dumps(metrics)}])
    run.dist.barrier()
    return final


def cleanup(run: LoopState) -> Trained:
    """Free the model and optimizer (and the GPU cache), merge LoRA adapters when asked (rank 0); the output names
    the checkpoint evaluation loads."""
    import torch

    run.model = run.optimizer = None
    if run.device.startswith("cuda"):
        torch.cuda.empty_cache()
    # what evaluation loads: the last epoch, or with LoRA + merge its adapter merged into the student
    lora, final = run.config.student.lora, run.ckpt_root / f"epoch-{run.epochs}"
    if lora and lora.merge:
        final = final / "merged"
    if run.dist.main and final.name == "merged" and not final.exists():
        merge_adapter(final.parent, final)
    run.dist.barrier()
    run.dist.close()
    return Trained(fp=run.lineage.fp, final_dir=str(final), init_dir=run.init_dir,
                   epochs=run.epochs, target_format=run.cfg.target_format, loss=run.cfg.loss, n_examples=len(run.data),
                   n_truncated=run.n_truncated, n_unweighted=run.staged.n_unweighted if run.staged else None,
                   resumed_from_epoch=run.start_epoch, device=run.device, history=run.history)


def run_training(ws: Workspace, lineage: Lineage, config: DistillConfig, inputs: TrainInputs,
                 on_epoch: Callable[[int, int, dict], None] | None = None) -> Trained:
    """setup -> run_epoch / save_checkpoint per epoch (from the last whole one) -> cleanup."""
    run = setup(ws, lineage, config, inputs)
    try:
        for epoch in range(run.start_epoch + 1, run.epochs + 1):
            metrics = run_epoch(run, epoch)
            save_checkpoint(run, epoch, metrics)
            if on_epoch and run.dist.main:
                on_epoch(epoch, run.epochs, metrics)
        return cleanup(run)
    finally:
        if run.on_policy:        # a vLLM scorer keystep started goes down with the run, finished or not
            run.on_policy.close()
