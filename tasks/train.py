"""Train stage: distil the student on the kept rationales.

Std-CoT: NLL on rationale + answer. KPOD (§4.3-4.4): epoch e reads curriculum stage min(e, T) from its Parquet
shard; the input is the question + the first c_i steps (no loss there), the target the remaining steps + the
answer, and the loss −Σ_j w_j·log P(r_j | ·) − Σ log P(y | ·) with w the learned token weights (§4.1).

Input: the student-init model dir, kept rationales (generation output), `TrainConfig` (+ for KPOD: token
weights, steps, curriculum shards). Output:
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


def encode_example(tokenizer, prompt: str, target: str, max_length: int,
                   input_chars: int = 0) -> tuple[list[int], list[int], bool]:
    """Token ids of `<bos> prompt target <eos>` and labels that are IGNORE on the prompt (no loss there) and on
    the first `input_chars` characters of the target (the curriculum's input steps)."""
    text = prompt + " " + target
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    boundary = len(prompt) + (1 + input_chars if input_chars else 0)
    for tid, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tid)
        labels.append(tid if end > boundary else IGNORE)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def encode_rationale(tokenizer, teacher_cfg: TeacherConfig, row: dict, max_length: int, target: str | None = None,
                     input_chars: int = 0) -> tuple[list[int], list[int], bool]:
    """`encode_example` for a kept-rationale row: its prompt, and by default the rationale-then-answer target."""
    if target is None:
        target = training_target(row["text"], row["answer"], teacher_cfg)
    return encode_example(tokenizer, format_prompt(teacher_cfg, row["question"]), target, max_length, input_chars)


def format_target(fmt: str, text: str, answer: str, teacher_cfg: TeacherConfig, key_text: str = "",
                  shuffle_seed: str = "") -> str:
    """The student's target for a Mysteries target format (Wadhwa et al. 2024, §3)."""
    if fmt == "cot_then_label":
        return training_target(text, answer, teacher_cfg)
    phrase = teacher_cfg.answer_template.format(answer=answer)
    rationale = text.strip()
    if rationale.endswith(phrase):
        rationale = rationale[: -len(phrase)].rstrip()
    if fmt == "label_only":
        return phrase
    if fmt == "label_then_cot":
        return f"{phrase} {rationale}"
    if fmt == "label_then_shuffled_cot":
        words = rationale.split()
        random.Random(shuffle_seed).shuffle(words)  # fixed per rationale: every epoch sees the same permutation
        return f"{phrase} {' '.join(words)}"
    if fmt == "label_then_keytokens":
        return f"{phrase} {key_text.strip()}"
    raise ValueError(f"config key 'train.target_format': unknown format {fmt!r}")


def keytoken_texts(catalog, tokenizer, teacher_cfg: TeacherConfig, rows: list[dict], weights_fp: str) -> dict[str, str]:
    """rationale_id -> its top-k keypoint tokens (by learned weight, §4.1) decoded in text order."""
    stored = {r["rationale_id"]: r for r in catalog.query("token_weights_of", weights_fp=weights_fp)}
    out = {}
    for r in rows:
        kp = stored.get(r["rationale_id"])
        if kp is None:
            continue
        ids, _, _ = encode_rationale(tokenizer, teacher_cfg, r, 1 << 30)
        out[r["rationale_id"]] = tokenizer.decode([ids[kp["token_start"] + j] for j in kp["keypoints"]])
    return out


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

    def __init__(self, catalog, tokenizer, teacher_cfg: TeacherConfig, rows: list[dict], kpod: dict, max_length: int):
        from tasks.keypoints import load_weights

        self.tokenizer, self.teacher_cfg, self.rows, self.max_length = tokenizer, teacher_cfg, rows, max_length
        self.shards_dir, self.stages = kpod["shards_dir"], kpod["stages"]
        self.weights = load_weights(catalog, kpod["weights_fp"])
        self.step_ends: dict[str, list[int]] = {}
        for st in catalog.query("steps_of_rationales", steps_fp=kpod["steps_fp"]):
            self.step_ends.setdefault(st["rationale_id"], []).append(st["char_end"])
        self.n_unweighted = sum(r["rationale_id"] not in self.weights for r in rows)
        self._cache: dict[int, list[tuple]] = {}

    def stage_of(self, epoch: int) -> int:
        return min(epoch, self.stages)

    def sequences(self, epoch: int) -> list[tuple[list[int], list[int], list[float]]]:
        from tasks.curriculum import stage_shard

        stage = self.stage_of(epoch)
        if stage not in self._cache:
            prefix = stage_shard(self.shards_dir, stage)
            out = []
            for r in self.rows:
                c = prefix.get(r["rationale_id"], 0)
                input_chars = self.step_ends[r["rationale_id"]][c - 1] if c else 0
                ids, labels, _ = encode_rationale(self.tokenizer, self.teacher_cfg, r, self.max_length,
                                                  input_chars=input_chars)
                weights = [1.0] * len(ids)
                start, w = self.weights.get(r["rationale_id"], (0, []))
                for j, x in enumerate(w[: max(0, len(ids) - start)]):
                    weights[start + j] = x
                out.append((ids, labels, weights))
            self._cache = {stage: out}
        return self._cache[stage]


def last_whole_epoch(ckpt_root: Path) -> int:
    """Highest epoch whose checkpoint was fully written (published by rename), else 0."""
    epochs = [int(p.name.split("-")[1]) for p in ckpt_root.glob("epoch-*") if (p / "trainer_state.pt").exists()]
    return max(epochs, default=0)


def train_fingerprint(cfg: TrainConfig, student_fp: str, steps_fp: str, generation_fp: str,
                      kpod_upstream: list[str] | None = None) -> str:
    """`kpod_upstream`: the token-weights and curriculum fingerprints a KPOD run reads."""
    return fingerprint("train", cfg, [student_fp, steps_fp, generation_fp, *(kpod_upstream or [])], CODE_VERSION)


def warm_up_student(catalog, teacher_cfg: TeacherConfig, generation: dict, student: dict, epochs: int,
                    max_length: int) -> str:
    """The student after `epochs` of Std-CoT on the kept rationales — the "student before distillation" that
    KPOD's answer predictor (§4.1) and difficulty scoring (§4.2) read for a scratch student, whose random
    initial weights would say nothing. Trained once per (student, rationales, epochs); returns its folder."""
    if not epochs:
        return student["model_dir"]
    from storage.workspace import Workspace

    fp = fingerprint("student-warmup", {"epochs": epochs, "max_length": max_length},
                     [student["student_fp"], generation["fingerprint"]], CODE_VERSION)
    warm = train_student(catalog, TrainConfig(epochs=epochs, seed=1), teacher_cfg, generation, student["model_dir"],
                         Workspace(catalog.path.parent).checkpoints_root(fp), fp, max_length, {"warmup_epochs": epochs})
    return warm["final_dir"]


def train_student(catalog, cfg: TrainConfig, teacher_cfg: TeacherConfig, generation: dict, init_dir: str,
                  ckpt_root: Path, fp: str, max_length: int, run_config: dict,
                  on_epoch: Callable[[int, int, dict], None] | None = None, kpod: dict | None = None) -> dict:
    """`kpod` (train.loss kpod): {"weights_fp", "steps_fp", "shards_dir", "stages"}."""
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
    if cfg.loss == "kpod" and not kpod:
        raise ValueError("train.loss 'kpod' needs token weights and a curriculum (run the distill/prepare flow)")
    if cfg.target_format == "label_then_keytokens" and not (kpod and kpod.get("weights_fp")):
        raise ValueError("train.target_format 'label_then_keytokens' needs token weights (run the distill/prepare flow)")
    key_texts = keytoken_texts(catalog, tokenizer, teacher_cfg, rows, kpod["weights_fp"]) \
        if cfg.target_format == "label_then_keytokens" else {}
    data, n_truncated = [], 0
    for r in rows:
        target = format_target(cfg.target_format, r["text"], r["answer"], teacher_cfg, key_texts.get(r["rationale_id"], ""),
                               shuffle_seed=r["rationale_id"])
        ids, labels, truncated = encode_rationale(tokenizer, teacher_cfg, r, max_length, target)
        data.append((ids, labels))
        n_truncated += truncated
    staged = KpodData(catalog, tokenizer, teacher_cfg, rows, kpod, max_length) if cfg.loss == "kpod" else None
    epochs = cfg.epochs
    if cfg.match_cot_tokens and cfg.target_format != "cot_then_label":
        # as many training tokens as `epochs` passes over rationale-then-answer sequences (Mysteries, equal budget)
        cot = sum(len(encode_rationale(tokenizer, teacher_cfg, r, max_length)[0]) for r in rows)
        epochs = max(1, round(cfg.epochs * cot / sum(len(ids) for ids, _ in data)))
    steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * epochs
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
    for epoch in range(start_epoch + 1, epochs + 1):
        t0, tokens, loss_sum, n_micro = time.perf_counter(), 0, 0.0, 0
        if staged:
            data = staged.sequences(epoch)   # curriculum stage min(epoch, T): same examples, other prefixes
        order = list(range(len(data)))
        random.Random(f"{cfg.seed}-{epoch}").shuffle(order)  # per-epoch order: resumes see the same data
        torch.manual_seed(cfg.seed * 1000 + epoch)
        micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for i, idx in enumerate(micro):
            batch = {k: v.to(device) for k, v in collate([data[j] for j in idx], tokenizer.pad_token_id).items()}
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = weighted_nll(logits, batch["labels"], batch["weights"])
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            n_micro += 1
            tokens += int(batch["attention_mask"].sum())
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(micro):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        metrics = {"epoch": epoch, "stage": staged.stage_of(epoch) if staged else None, "loss": loss_sum / max(n_micro, 1), "tokens": tokens,
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
            on_epoch(epoch, epochs, metrics)

    # ---- cleanup ----------------------------------------------------------------------------------------
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    summary = {"train_fp": fp, "final_dir": str(ckpt_root / f"epoch-{epochs}"), "init_dir": str(init_dir),
               "epochs": epochs, "target_format": cfg.target_format,
               "n_examples": len(data), "n_truncated": n_truncated, "resumed_from_epoch": start_epoch, "loss": cfg.loss,
               "n_unweighted": staged.n_unweighted if staged else None,
               "device": device, "history": history}
    with catalog.transaction() as con:
        catalog.record_stage(con, fp, stage="train", code_version=CODE_VERSION, config=cfg,
                             upstream=[generation["fingerprint"], *([kpod["weights_fp"], kpod["shards_dir"]] if staged else [])],
                             summary=summary)
    return summary


# ---- Prefect wrapper ------------------------------------------------------------------------------
from prefect import get_run_logger  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402

from storage.workspace import Workspace  # noqa: E402
from tasks.prefect_stage import stage_task  # noqa: E402


@stage_task("train-student", tags=["gpu"])
def train_task(workspace: str, cfg: TrainConfig, teacher_cfg: TeacherConfig, generation: dict, student: dict,
               fp: str, max_length: int, run_config: dict, kpod: dict | None = None) -> dict:
    ws = Workspace(workspace)
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="train-progress", description=f"training {fp}")

    def on_epoch(epoch: int, total: int, metrics: dict) -> None:
        update_progress_artifact(progress, 100.0 * epoch / total)
        logger.info("epoch %d/%d loss %.4f (%.0f tokens/s)", epoch, total, metrics["loss"], metrics["tokens_per_s"])

    summary = train_student(ws.catalog(), cfg, teacher_cfg, generation, student["model_dir"], ws.checkpoints_root(fp),
                            fp, max_length, run_config, on_epoch=on_epoch, kpod=kpod)
    update_progress_artifact(progress, 100.0)
    return summary
