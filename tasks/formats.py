"""The student's sequence layout, in one place: every stage that tokenises for the student calls this module.

A training sequence is `<bos> prompt " " target <eos>`:

    prompt  the KPOD zero-shot CoT prompt (few-shot demonstrations first, if any): "Q: {question}\\nA: Let's think step by step."
    target  by target format (Wadhwa et al. 2024): the rationale then the answer sentence (`cot_then_label`), the
            answer sentence alone, or the answer sentence then the rationale / its shuffled words / its keypoints

Labels are IGNORE (no loss) on `<bos>` and the prompt, and for a KPOD curriculum stage also on the first c_i
rationale steps given as input; the rest of the target and `<eos>` carry loss. For example, with prefix steps
c_i = 1 of "He has 3 + 4 = 7. So 7 x 2 = 14. Therefore, the answer is 14.":

    ids     <bos> Q: ... step by step.  He has 3 + 4 = 7.  So 7 x 2 = 14.  Therefore, the answer is 14.  <eos>
    labels  IGNORE ................................................ So 7 x 2 = 14.  Therefore, the answer is 14.  <eos>

Token positions — of the rationale, of each step and of the answer sentence — always index `ids` of this
sequence (`<bos>` is position 0). The steps stage stores step spans in these positions, the token-weights stage
stores one weight per rationale position, difficulty scores these positions, the KPOD loss multiplies the labels
at these positions, and evaluation prompts the model with the sequence's `<bos> prompt` and decodes the target.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from keystep.config import TeacherConfig

IGNORE = -100          # a label that carries no loss
NO_CUT = 1 << 30       # a max_length that never cuts: the whole sequence, for its token positions


# ---- text ---------------------------------------------------------------------------------------------
def format_prompt(cfg: TeacherConfig, question: str) -> str:
    """KPOD's zero-shot CoT prompt, preceded by the few-shot demonstrations if any (the teacher's prompt too)."""
    demos = [f"{cfg.prompt_template.format(question=d.question)} {d.rationale} {cfg.answer_template.format(answer=d.answer)}"
             for d in cfg.few_shot]
    return "\n\n".join([*demos, cfg.prompt_template.format(question=question)])


def training_target(text: str, answer: str, cfg: TeacherConfig) -> str:
    """The rationale ending with the answer sentence (appended if the teacher left it out)."""
    phrase = cfg.answer_template.format(answer=answer)
    text = text.strip()
    return text if text.endswith(phrase) else f"{text} {phrase}"


def format_target(fmt: str, text: str, answer: str, cfg: TeacherConfig, key_text: str = "",
                  shuffle_seed: str = "") -> str:
    """The student's target for a Mysteries target format (Wadhwa et al. 2024, §3)."""
    if fmt == "cot_then_label":
        return training_target(text, answer, cfg)
    phrase = cfg.answer_template.format(answer=answer)
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


# ---- tokens -------------------------------------------------------------------------------------------
@dataclass
class Sequence:
    """One training sequence, as every stage that trains, packs or scores the student reads it.

    ids      `<bos> prompt " " target <eos>`, cut to max_length
    labels   the token ids that carry loss, IGNORE elsewhere (the prompt, a KPOD stage's input steps)
    offsets  per token, its char span within the *target* (negative for prompt tokens; empty for <bos>, <eos>)
    length   its length before the cut at max_length
    weights  per token, its loss weight (KPOD: the learned token weights on the rationale); None: 1 everywhere
    teacher_topk  for logit distillation, (ids, logprobs), each (len(ids), k): row j the teacher's top-k for token j

    >>> seq = Sequence(ids=[1, 7, 8, 2], labels=[IGNORE, IGNORE, 8, 2], offsets=[(0, 0)] * 4, length=4)
    >>> seq.supervised, seq.truncated
    (2, False)
    """
    ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    length: int
    weights: list[float] | None = None
    teacher_topk: tuple | None = None

    @property
    def truncated(self) -> bool:
        return self.length > len(self.ids)

    @property
    def supervised(self) -> int:
        """Tokens that carry loss. The first never does: nothing before it predicts it (so a packed row's loss is
        its sequences' losses, whatever shares the row)."""
        return sum(y != IGNORE for y in self.labels[1:])

    def loss_weights(self) -> list[float]:
        return self.weights if self.weights is not None else [1.0] * len(self.ids)


def encode(tokenizer, prompt: str, target: str, max_length: int, input_chars: int = 0) -> Sequence:
    """`<bos> prompt " " target <eos>`, cut to `max_length`; labels IGNORE on the prompt and on the first
    `input_chars` characters of the target (a KPOD stage's input steps)."""
    text = prompt + " " + target
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    shift = len(prompt) + 1
    boundary = len(prompt) + (1 + input_chars if input_chars else 0)
    ids, labels, offsets = list(bos), [IGNORE] * len(bos), [(0, 0)] * len(bos)
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tid)
        labels.append(tid if end > boundary else IGNORE)
        offsets.append((start - shift, end - shift))
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    offsets.append((len(target), len(target)))
    return Sequence(ids[:max_length], labels[:max_length], offsets[:max_length], len(ids))


def encode_rationale(tokenizer, cfg: TeacherConfig, row: dict, max_length: int, target: str | None = None,
                     input_chars: int = 0) -> Sequence:
    """`encode` for a kept-rationale row: its prompt, and by default the rationale-then-answer target."""
    if target is None:
        target = training_target(row["text"], row["answer"], cfg)
    return encode(tokenizer, format_prompt(cfg, row["question"]), target, max_length, input_chars)


def token_spans(seq: Sequence, char_spans: list[tuple[int, int]]) -> list[tuple[int | None, int | None]]:
    """Char spans of the target -> [start, end) token positions in `seq.ids` (None where no token overlaps)."""
    out = []
    for a, b in char_spans:
        idx = [j for j, (s, e) in enumerate(seq.offsets) if e > a and s < b and e > s]
        out.append((idx[0], idx[-1] + 1) if idx else (None, None))
    return out


def standalone_tokenizer(tokenizer, context: int | None = None):
    """The tokenizer as saved beside a student, so that any client (TRL, lm-eval, a `pipeline`, vLLM serving the
    folder) feeds the model what keystep trained it on: a plain `tokenizer(text)` encodes `<bos> text` (keystep
    prepends <bos> itself, with add_special_tokens=False, so its own encodings are unchanged), and `model_max_length`
    is the model's context; with no chat template of its own it gets CHAT_TEMPLATE. Changes `tokenizer` in place
    and returns it."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("0")["input_ids"][:1] != [bos]:
        if not hasattr(type(tokenizer), "update_post_processor"):
            raise ValueError(f"student tokenizer {type(tokenizer).__name__} cannot be set to add its <bos> token; "
                             "use a fast (tokenizers) tokenizer")
        tokenizer.add_bos_token = True        # a TemplateProcessing post-processor, saved in tokenizer.json
    if context:
        tokenizer.model_max_length = context
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# A chat template for students that have none: `messages` (user = prompt, assistant = target) render as exactly the
# training text `<bos> prompt " " target <eos>`; the {% generation %} span marks the target for assistant-only loss.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {% generation %}"
                 "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                 "{% endfor %}")


def generation_prompt(tokenizer, prompt: str) -> str:
    """What evaluation feeds the model: the training sequence's `<bos> prompt` (the model then writes " target")."""
    return (tokenizer.bos_token or "") + prompt


@dataclass
class EncodedRationale:
    """A kept rationale's training sequence with its rationale and step positions (token weights, difficulty)."""
    rationale_id: str
    ids: list[int]            # <bos> prompt target <eos>, as the student trains on it
    rationale_start: int      # first rationale token
    rationale_end: int        # one past the last rationale token (the answer sentence follows)
    step_ends: list[int]      # token position one past each rationale step
    answer: str
    char_spans: list[tuple[int, int]]  # per token: char span in the target text (for evaluation against marks)
    step_results: list[str | None] = field(default_factory=list)   # per step: the last number it states, if any
    result_spans: list[tuple[int, int] | None] = field(default_factory=list)   # per step: that number's token positions


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def rationale_positions(tokenizer, cfg: TeacherConfig, row: dict, step_spans: list[tuple[int | None, int | None]],
                        max_length: int) -> EncodedRationale | None:
    """The rationale part of a kept row's sequence and its step ends (`step_spans`: the steps stage's token spans).
    None when the sequence does not fit `max_length` or has no rationale token."""
    seq = encode_rationale(tokenizer, cfg, row, NO_CUT)
    rationale_chars = len(training_target(row["text"], row["answer"], cfg)) - len(cfg.answer_template.format(answer=row["answer"]))
    # a rationale token ends inside the rationale (a byte-level token carries its leading space, so the token
    # " T" of "Therefore" starts one char early and must not count)
    first = 1 if tokenizer.bos_token_id is not None else 0
    r_tokens = [j for j, (a, b) in enumerate(seq.offsets) if 0 < b <= rationale_chars and j >= first]
    if not r_tokens or len(seq.ids) > max_length:
        return None
    start, end = r_tokens[0], r_tokens[-1] + 1
    ends = sorted({min(max(b, start + 1), end) for a, b in step_spans if b is not None and a < end}) or [end]
    results, result_spans = [], []
    for a, b in zip([start, *ends[:-1]], ends):
        numbers = _NUMBER.findall(tokenizer.decode(seq.ids[a:b]))
        results.append(numbers[-1].replace(",", "") if numbers else None)
        result_spans.append(_last_number_tokens(tokenizer, seq.ids, a, b))
    return EncodedRationale(row["rationale_id"], seq.ids, start, end, ends, row["answer"], seq.offsets, results,
                            result_spans)


def _last_number_tokens(tokenizer, ids: list[int], a: int, b: int) -> tuple[int, int] | None:
    """[start, end) positions of the tokens of the last number in ids[a:b] (one number may span several tokens:
    " 1", ",", "500"); None when no token there holds a digit."""
    texts = [tokenizer.decode([t]) for t in ids[a:b]]
    digit = [j for j, t in enumerate(texts) if any(c.isdigit() for c in t)]
    if not digit:
        return None
    start = end = digit[-1]
    # walk back over the tokens the number continues from: a token that starts without a space continues the
    # previous one when that one is part of a number too
    while start > 0 and not texts[start][:1].isspace() and re.fullmatch(r"\$?[\d.,]+", texts[start - 1].strip()):
        start -= 1
    return a + start, a + end + 1


def kpod_sequence(tokenizer, cfg: TeacherConfig, row: dict, max_length: int, step_char_ends: list[int],
                  prefix_steps: int, weights: tuple[int, list[float]] | None, scale: str = "raw",
                  floor: float = 0.0) -> Sequence:
    """A KPOD curriculum stage's sequence (§4.3-4.4): the first `prefix_steps` steps are input (no loss), the rest
    of the rationale carries its learned token weights (`weights`: first rationale position, one weight each), the
    answer sentence weight 1. `floor` f: a rationale token's weight is f + (1 − f)·w (`train.token_weight_floor`).
    `scale` 'sequence_mean': then all weights divided by their mean over the supervised tokens
    (`train.token_weight_scale`)."""
    input_chars = step_char_ends[prefix_steps - 1] if prefix_steps else 0
    seq = encode_rationale(tokenizer, cfg, row, max_length, input_chars=input_chars)
    loss_weights = [1.0] * len(seq.ids)
    start, w = weights or (0, [])
    for j, x in enumerate(w[: max(0, len(seq.ids) - start)]):
        loss_weights[start + j] = floor + (1 - floor) * x
    if scale == "sequence_mean":
        supervised = [x for x, lab in zip(loss_weights, seq.labels) if lab != IGNORE]
        mean = sum(supervised) / len(supervised) if supervised else 1.0
        loss_weights = [x / mean for x in loss_weights] if mean > 0 else loss_weights
    seq.weights = loss_weights
    return seq


def keypoints(weights: list[float], top_k: int) -> list[int]:
    """Indices (within the rationale) of the top-k weighted tokens, in text order."""
    return sorted(sorted(range(len(weights)), key=lambda j: -weights[j])[:top_k])


def keytoken_text(tokenizer, cfg: TeacherConfig, row: dict, rationale_start: int, keypoints: list[int]) -> str:
    """The top-k keypoint tokens of a rationale (indices within the rationale, §4.1) decoded in text order."""
    ids = encode_rationale(tokenizer, cfg, row, NO_CUT).ids
    return tokenizer.decode([ids[rationale_start + j] for j in keypoints])
