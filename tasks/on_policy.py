"""On-policy distillation (`train.loss: on_policy`; GKD, Agarwal et al. 2024): what it adds to the training loop
(tasks/training.py) — the student's own samples, the teacher's scores of them, the divergence, the epoch's record.

Input: the loop's student, sampled in the training process with HF generate (the default engine: what a CPU and a
small student need); the kept rationales, whose questions are the prompts and whose gold answers grade the samples;
the teacher-scores scorer (tasks/teacher_scores.py: a local forward pass of teacher_scores.model, or a vLLM server's
prompt_logprobs). Output per epoch: `<workspace>/on-policy/<train fp>/epoch-N.parquet`, one row per sample (its
step, rationale, token ids, whether its answer is right), indexed in the catalog's `on_policy_samples`, and the
epoch's figures in the checkpoint's history (share of on-policy steps, sample accuracy, mean reverse KL per token,
seconds sampling / scoring / updating) — the training task's artifacts show them per epoch.

Which steps are on-policy and what the student samples are functions of (train.seed, epoch, step) and the weights,
drawn from a forked RNG (the training stream is untouched): a run resumed from its last whole epoch samples what the
killed one sampled, so the teacher's scores of the killed epoch's samples, stored by sequence hash as they were
bought, are found, not paid again.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from keystep.config import DistillConfig
from storage.workspace import Workspace, write_atomic
from tasks.answers import extract_answer, is_correct
from tasks.formats import IGNORE, Sequence, format_prompt
from tasks.stage import pyplot, save_figure
from tasks.teacher_backends import TeacherUnavailable
from storage.catalog import sql
from tasks.teacher_scores import (aligned_with_tokens, load_scores, score_missing, scorer, scorer_fingerprint,
                                  sequence_hash)

if TYPE_CHECKING:
    import torch


# ---- the loss ---------------------------------------------------------------------------------------------------
def jsd_buckets(s: "torch.Tensor", t: "torch.Tensor", beta: float) -> "torch.Tensor":
    """Per row, the generalized JSD of GKD §3 between log-distributions s (student) and t (teacher) over the last
    dimension, as TRL's `generalized_jsd_loss` computes it: β = 0 KL(T ‖ S), β = 1 KL(S ‖ T) (the reverse KL), else
    β·KL(T ‖ M) + (1 − β)·KL(S ‖ M) with M = β·T + (1 − β)·S."""
    import torch

    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def generalized_jsd_sum(logits: "torch.Tensor", labels: "torch.Tensor", weights: "torch.Tensor",
                        teacher_ids: "torch.Tensor", teacher_logprobs: "torch.Tensor", beta: float) -> "torch.Tensor":
    """Σ_j w_j·JSD_β(p_T,j, p_S,j) over labelled tokens j (`jsd_buckets`), both distributions over k + 1 buckets:
    the teacher's top-k tokens and one for the rest of the vocabulary. p_T: the teacher's top-k probabilities and
    1 − their sum (floored at 1e-6 and renormalised: they are float16 on disk); p_S: the student's probabilities of
    the same k tokens and the rest of its mass (exact, a log-sum-exp over the other tokens) — so mass the student
    puts where the teacher has almost none is penalised, which renormalising over the top-k alone would hide."""
    import torch

    z, y, ids = logits[:, :-1].float(), labels[:, 1:], teacher_ids[:, 1:]
    s_all = torch.log_softmax(z, dim=-1)
    s_tail = s_all.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    s = torch.cat([s_all.gather(-1, ids), s_tail], dim=-1)
    t_top = teacher_logprobs[:, 1:].float()
    t_tail = torch.log(torch.clamp(1 - t_top.exp().sum(-1, keepdim=True), min=1e-6))
    t = torch.log_softmax(torch.cat([t_top, t_tail], dim=-1), dim=-1)
    return (jsd_buckets(s, t, beta) * weights[:, 1:] * (y != IGNORE)).sum()


# ---- sampling -----------------------------------------------------------------------------------------------
def sample_completions(model, prompts: list[list[int]], pad_id: int, eos_id: int, temperature: float,
                       max_new_tokens: int, seed: int) -> list[list[int]]:
    """Per prompt (token ids, <bos> first), the ids the student samples after it, up to its <eos> (kept): drawn from
    its distribution at `temperature` (no top-k / top-p cut), the RNG seeded by `seed` inside a fork of torch's, so
    the draws are a function of (weights, prompts, seed) and the training stream is left as it was."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):      # left-padded: every prompt ends where sampling starts
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    was_training = model.training
    model.eval()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=eos_id)
    model.train(was_training)
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out[:, width:].tolist()]


def step_seed(seed: int, epoch: int, step: int, what: str) -> int:
    return random.Random(f"{seed}-{epoch}-{step}-{what}").getrandbits(63)


# ---- what on-policy training adds to the loop -----------------------------------------------------------------
class OnPolicy:
    """Which steps sample, the samples and their teacher scores, and the epoch's record — built by the loop's
    `setup` for `train.loss: on_policy`; `close` releases the scorer (a vLLM server keystep started)."""

    def __init__(self, ws: Workspace, config: DistillConfig, train_fp: str, tokenizer, rows: list[dict], device: str):
        self.ws, self.config, self.train_fp, self.tokenizer, self.rows = ws, config, train_fp, tokenizer, rows
        self.cfg, self.seed = config.train.on_policy, config.train.seed
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # `<bos> prompt`, as the training sequences start (the student then writes " target <eos>")
        self.prompts = [bos + tokenizer(format_prompt(config.teacher, r["question"]), add_special_tokens=False).input_ids
                        for r in rows]
        self.max_length, self.device = config.student.max_length, device
        ts = config.teacher_scores
        self.held = SimpleNamespace(scorer_fp=scorer_fingerprint(ts), captured_fp=None, k=ts.k)   # what load_scores reads
        self._stack, self._score = ExitStack(), None
        self.reset()

    def reset(self) -> None:
        """The epoch's counters: steps, on-policy steps, samples, reverse-KL sum and tokens, seconds."""
        self.samples: list[dict] = []
        self.n_steps = self.n_on = 0
        self.kl_sum = self.kl_tokens = 0.0
        self.seconds = {"sample": 0.0, "score": 0.0}

    def supervised_epoch(self, epoch: int) -> bool:
        """One of the first `sft_epochs`: Std-CoT, the NLL on the teacher's text (the SFT start GKD assumes)."""
        return epoch <= self.cfg.sft_epochs

    def is_on_policy(self, epoch: int, step: int) -> bool:
        """GKD: with probability λ a step trains on the student's own samples (none in a supervised epoch)."""
        self.n_steps += 1
        on = (not self.supervised_epoch(epoch)
              and random.Random(step_seed(self.seed, epoch, step, "on-policy")).random() < self.cfg.lmbda)
        self.n_on += on
        return on

    def sequences(self, model, group: list[list[int]], epoch: int, step: int) -> dict[int, Sequence]:
        """The step's questions (data indices by micro-batch), each answered by a sample of the student, with the
        teacher's top-k at every token (row 0, which nothing predicts, zeros): index -> its `Sequence`."""
        from tasks.parallel import unwrap

        t0 = time.perf_counter()
        out: dict[int, Sequence] = {}
        for m, idx in enumerate(group):
            room = self.max_length - max(len(self.prompts[i]) for i in idx)
            completions = sample_completions(unwrap(model), [self.prompts[i] for i in idx], self.tokenizer.pad_token_id,
                                             self.tokenizer.eos_token_id, self.cfg.temperature,
                                             max(1, min(self.cfg.max_new_tokens, room)),
                                             step_seed(self.seed, epoch, step, f"sample-{m}"))
            for i, c in zip(idx, completions):
                p = self.prompts[i]
                out[i] = Sequence(ids=p + c, labels=[IGNORE] * len(p) + c, offsets=[(0, 0)] * (len(p) + len(c)),
                                  length=len(p) + len(c))
                self.record(step, i, p, c)
        t1 = time.perf_counter()
        self.seconds["sample"] += t1 - t0
        self.attach_scores(list(out.values()), epoch, step)
        self.seconds["score"] += time.perf_counter() - t1
        return out

    def record(self, step: int, i: int, prompt: list[int], completion: list[int]) -> None:
        row = self.rows[i]
        text = self.tokenizer.decode(completion, skip_special_tokens=True)
        answer_type = row.get("answer_type") or "number"
        self.samples.append({"step": step, "rationale_id": row["rationale_id"], "n_prompt": len(prompt),
                             "ids": np.asarray(prompt + completion, np.int32).tobytes(), "text": text.strip(),
                             "correct": is_correct(extract_answer(text, answer_type), row["answer"], answer_type)})

    def scorer(self):
        if self._score is None:     # opened at the first on-policy step (λ = 0 never loads the teacher)
            ts = self.config.teacher_scores
            self._score = self._stack.enter_context(scorer(self.ws, ts, self.device, self.held.scorer_fp))
        return self._score

    def attach_scores(self, seqs: list[Sequence], epoch: int, step: int) -> None:
        """Each sample's teacher top-k, scored once by sequence hash (stored as generation's scores are: a resumed
        run's samples are found, not paid again)."""
        import openai

        ts = self.config.teacher_scores
        by_hash = {sequence_hash(s.ids): s.ids for s in seqs}
        try:
            score_missing(self.ws, ts, self.device, by_hash, len(self.tokenizer), score=self.scorer())
        except (openai.APIError, OSError) as err:
            where = ts.server_url or ts.model
            raise TeacherUnavailable(
                f"the teacher scorer ({ts.engine}, {where}) failed after teacher_scores.max_retries={ts.max_retries} "
                f"retries at epoch {epoch}, step {step}: {type(err).__name__}: {str(err)[:200]}; the finished epochs "
                "are kept: rerun to resume (the samples scored so far are not paid for again)") from None
        loaded = load_scores(self.ws, self.held, list(by_hash))
        for s in seqs:
            s.teacher_topk = aligned_with_tokens(*loaded[sequence_hash(s.ids)])

    def add_divergence(self, logits: "torch.Tensor", batch: dict) -> None:
        """The batch's reverse KL to the teacher (β = 1 whatever the loss's β), summed for the epoch's mean."""
        import torch

        with torch.no_grad():
            self.kl_sum += float(generalized_jsd_sum(logits, batch["labels"], torch.ones_like(batch["weights"]),
                                                     batch["teacher_ids"], batch["teacher_logprobs"], 1.0))
        self.kl_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())

    def finish_epoch(self, epoch: int, seconds: float) -> dict:
        """Write the epoch's samples (Parquet, then the catalog's index) and return its figures; counters reset."""
        n, right = len(self.samples), sum(s["correct"] for s in self.samples)
        self.write_samples(epoch)
        figures = {"on_policy_share": self.n_on / max(self.n_steps, 1), "samples": n,
                   "sample_accuracy": right / n if n else None,
                   "reverse_kl": self.kl_sum / self.kl_tokens if self.kl_tokens else None,
                   "sample_s": round(self.seconds["sample"], 2), "score_s": round(self.seconds["score"], 2),
                   "update_s": round(seconds - self.seconds["sample"] - self.seconds["score"], 2)}
        self.reset()
        return figures

    def write_samples(self, epoch: int) -> None:
        import pyarrow as pa

        rel = Path("on-policy") / self.train_fp / f"epoch-{epoch}.parquet"
        columns = ("step", "rationale_id", "n_prompt", "ids", "text", "correct")
        # a killed epoch's file is replaced by its rerun's, which sampled the same
        write_atomic(self.ws.root / rel, pa.table({c: [s[c] for s in self.samples] for c in columns}))
        catalog = self.ws.catalog()
        with catalog.transaction() as con:
            con.execute(sql("on_policy_forget"), {"train_fp": self.train_fp, "epoch": epoch})
            catalog.insert(con, "on_policy_samples", [{"train_fp": self.train_fp, "epoch": epoch, "part": str(rel),
                                                       "n_samples": len(self.samples),
                                                       "n_correct": sum(s["correct"] for s in self.samples)}])

    def close(self) -> None:
        self._stack.close()
        self._score = None


# ---- the report: per epoch, a log line, a table and a plot -------------------------------------------------------
FIGURES = ("on_policy_share", "samples", "sample_accuracy", "reverse_kl", "sample_s", "score_s", "update_s")


def shown(value: float | None, spec: str = "{:.3f}") -> str:
    """A figure as the report writes it; an epoch without on-policy steps has none ("—")."""
    return "—" if value is None else spec.format(value)


def epoch_line(m: dict) -> str:
    """One epoch's on-policy figures, for the task's log."""
    return (f"{shown(m['on_policy_share'], '{:.0%}')} of steps on-policy, {m['samples']} samples, "
            f"{shown(m['sample_accuracy'], '{:.1%}')} right, reverse KL {shown(m['reverse_kl'])}/token; "
            f"{m['sample_s']:.0f} s sampling, {m['score_s']:.0f} s scoring, {m['update_s']:.0f} s updating")


def on_policy_table(history: list[dict]) -> list[dict]:
    """Per epoch: the share of on-policy steps, the student's sample accuracy, the mean reverse KL per token, and the
    seconds spent sampling, scoring and updating."""
    return [{"epoch": h["epoch"], "loss": round(h["loss"], 4),
             **{k: (round(h[k], 4) if isinstance(h.get(k), float) else h.get(k)) for k in FIGURES}}
            for h in history]


def on_policy_markdown(history: list[dict], out_dir: Path) -> str:
    """The table and a plot (sample accuracy and reverse KL by epoch; time per phase) as markdown, the PNG beside it."""
    rows = on_policy_table(history)
    lines = ["# On-policy distillation, per epoch", "",
             "| epoch | loss | on-policy share | samples | sample accuracy | reverse KL / token | sampling s | scoring s | update s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['loss']:.4f} | {shown(r['on_policy_share'], '{:.0%}')} | {r['samples']} | "
                     f"{shown(r['sample_accuracy'], '{:.1%}')} | {shown(r['reverse_kl'])} | {r['sample_s']:.1f} | "
                     f"{r['score_s']:.1f} | {r['update_s']:.1f} |")
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(epochs, [r["sample_accuracy"] if r["sample_accuracy"] is not None else np.nan for r in rows], "o-",
              label="sample accuracy")
    left.set_xlabel("epoch")
    left.set_ylabel("sample accuracy")
    kl = left.twinx()
    kl.plot(epochs, [r["reverse_kl"] if r["reverse_kl"] is not None else np.nan for r in rows], "s--", color="C1")
    kl.set_ylabel("reverse KL / token (dashed)")
    bottom = np.zeros(len(rows))
    for key, label in (("sample_s", "sampling"), ("score_s", "scoring"), ("update_s", "update")):
        values = np.array([r[key] for r in rows], dtype=float)
        right.bar(epochs, values, bottom=bottom, label=label)
        bottom += values
    right.set_xlabel("epoch")
    right.set_ylabel("seconds")
    right.legend()
    save_figure(fig, out_dir / "on-policy.png")
    return "\n".join([*lines, "", "![on-policy figures](on-policy.png)", ""])
