"""Steps stage: split each kept rationale into reasoning steps with char spans and student-token spans.

Input: kept rationales (teacher stage) and the student tokenizer (student stage). Output: `Steps`, rows in
`steps` under the steps fingerprint. Token spans [token_start, token_end) are positions in the student's training
sequence `<bos> prompt " " target <eos>` (tasks/formats.py).

Splitting: newlines (and so numbered lists) first, then sentence ends. Unlike KPOD's split on ".", a
boundary is never inside a number (0.3, $1.50, 1,000), after an abbreviation (e.g., Mr.), after a list
marker ("1."), or inside an equation (a boundary next to an operator or '=').
"""
from __future__ import annotations

import re

from keystep.config import DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.formats import NO_CUT, encode_rationale, token_spans, training_target
from tasks.stage import Made, Stage, StageInputs, StageOutput, kept_rationales
from tasks.student import Student
from tasks.teacher import Generation

CODE_VERSION = "1"

ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "approx", "no",
                 "fig", "inc", "ltd", "co", "cf", "al", "min", "hr", "hrs", "ft", "oz", "lb", "lbs", "mt", "ave"}
# candidate boundary: sentence punctuation, optional closing quote/bracket, then whitespace
_BOUNDARY = re.compile(r"[.!?][\"')\]]*(?=\s+)")
_OPERATOR = set("+-*/x×÷=")


def _is_boundary(text: str, end: int) -> bool:
    """`end` is just past the punctuation (and closing quotes); decide if a new step starts after it."""
    punct_at = end - 1
    while text[punct_at] in "\"')]":
        punct_at -= 1
    before = text[:punct_at]
    word = re.search(r"([A-Za-z.]+)$", before)
    if text[punct_at] == "." and word and word.group(1).lower().rstrip(".") in ABBREVIATIONS:
        return False
    if text[punct_at] == "." and re.fullmatch(r"\s*(?:\(?\d{1,2}\)?|[a-zA-Z]|step\s*\d+)", before, re.IGNORECASE):
        return False  # a list marker such as "1." at the start of the line
    after = text[end:].lstrip()
    if not after:
        return False
    prev_char = before.rstrip()[-1:] if before.strip() else ""
    if after[0] in _OPERATOR or prev_char in _OPERATOR:
        return False  # inside an equation: "3 + 4 = 7 . 7 x 2" style or a dangling operator
    return after[0].isupper() or after[0].isdigit() or after[0] in "$(\"'"


def split_steps(text: str, split_sentences: bool = True, max_steps: int | None = None) -> list[tuple[int, int]]:
    """Char spans [start, end) of the steps of `text`, stripped of surrounding whitespace."""
    spans: list[tuple[int, int]] = []
    for line in re.finditer(r"[^\n]+", text):
        pieces, start = [], line.start()
        if split_sentences:
            seg = line.group(0)
            for m in _BOUNDARY.finditer(seg):
                if _is_boundary(seg, m.end()):
                    pieces.append((start, line.start() + m.end()))
                    start = line.start() + m.end()
        pieces.append((start, line.end()))
        for a, b in pieces:
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                spans.append((a, b))
    if max_steps is not None and len(spans) > max_steps:
        spans = spans[: max_steps - 1] + [(spans[max_steps - 1][0], spans[-1][1])]
    return spans


class Steps(StageOutput):
    """Rationale steps: rows of `steps` under `fp`."""
    n_rationales: int
    n_steps: int
    mean_steps: float


class StepsInputs(StageInputs):
    """The kept rationales to split, and the student whose tokens the spans count."""
    generation: Generation
    student: Student


def steps_lineage(config: DistillConfig, inputs: StepsInputs) -> Lineage:
    return Lineage("steps", config.steps, (inputs.generation.fp, inputs.student.fp), CODE_VERSION)


def split_rationales(ws: Workspace, config: DistillConfig, inputs: StepsInputs, lineage: Lineage) -> Made:
    from transformers import AutoTokenizer

    catalog, cfg = ws.catalog(), config.steps
    tok = AutoTokenizer.from_pretrained(inputs.student.model_dir)
    rationales = kept_rationales(catalog, config, inputs.generation)
    rows, n_steps = [], []
    for r in rationales:
        target = training_target(r["text"], r["answer"], config.teacher)
        chars = split_steps(target, cfg.split_sentences, cfg.max_steps)
        toks = token_spans(encode_rationale(tok, config.teacher, r, NO_CUT), chars)
        n_steps.append(len(chars))
        for i, ((a, b), (ta, tb)) in enumerate(zip(chars, toks)):
            rows.append({"steps_fp": lineage.fp, "rationale_id": r["rationale_id"], "step_index": i, "text": target[a:b],
                         "char_start": a, "char_end": b, "token_start": ta, "token_end": tb})
    out = Steps(fp=lineage.fp, n_rationales=len(rationales), n_steps=len(rows),
                mean_steps=sum(n_steps) / len(n_steps) if n_steps else 0.0)
    return Made(out, {"steps": rows})


STEPS = Stage("steps", StepsInputs, Steps, steps_lineage, split_rationales)
