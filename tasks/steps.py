"""Steps stage: split each kept rationale into reasoning steps with char spans and student-token spans.

Input: kept rationales (teacher stage) and the student tokenizer (student-init stage). Output: rows in
`steps` under the steps fingerprint. Token spans index the tokens of the full training sequence
(prompt + " " + target) as the student sees it, [token_start, token_end).

Splitting: newlines (and so numbered lists) first, then sentence ends. Unlike KPOD's split on ".", a
boundary is never inside a number (0.3, $1.50, 1,000), after an abbreviation (e.g., Mr.), after a list
marker ("1."), or inside an equation (a boundary next to an operator or '=').
"""
from __future__ import annotations

import re

from keystep.config import StepsConfig, TeacherConfig
from storage.fingerprint import fingerprint

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


def token_spans(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]], shift: int) -> list[tuple[int, int]]:
    """Map char spans of the target (shifted by `shift` chars into the full sequence) to token index spans."""
    out = []
    for a, b in char_spans:
        a, b = a + shift, b + shift
        idx = [i for i, (s, e) in enumerate(offsets) if e > a and s < b and e > s]
        out.append((idx[0], idx[-1] + 1) if idx else (None, None))
    return out


def steps_fingerprint(cfg: StepsConfig, generation_fp: str, student_fp: str) -> str:
    return fingerprint("steps", cfg, [generation_fp, student_fp], CODE_VERSION)


def split_rationales(catalog, cfg: StepsConfig, teacher_cfg: TeacherConfig, generation: dict, tokenizer_dir: str,
                     fp: str) -> dict:
    from transformers import AutoTokenizer

    from tasks.teacher import format_prompt, training_target

    done = catalog.stage_output(fp)
    if done:
        return done["summary"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rationales = catalog.query("kept_rationales", dataset_fp=generation["dataset_fp"],
                               teacher_fp=generation["teacher_fp"], only_correct=teacher_cfg.keep_only_correct)
    rows, n_steps = [], []
    for r in rationales:
        target = training_target(r["text"], r["answer"], teacher_cfg)
        prompt = format_prompt(teacher_cfg, r["question"]) + " "
        chars = split_steps(target, cfg.split_sentences, cfg.max_steps)
        enc = tok(prompt + target, return_offsets_mapping=True, add_special_tokens=False)
        toks = token_spans(enc["offset_mapping"], chars, len(prompt))
        n_steps.append(len(chars))
        for i, ((a, b), (ta, tb)) in enumerate(zip(chars, toks)):
            rows.append({"steps_fp": fp, "rationale_id": r["rationale_id"], "step_index": i, "text": target[a:b],
                         "char_start": a, "char_end": b, "token_start": ta, "token_end": tb})
    summary = {"steps_fp": fp, "n_rationales": len(rationales), "n_steps": len(rows),
               "mean_steps": sum(n_steps) / len(n_steps) if n_steps else 0.0}
    with catalog.transaction() as con:
        con.execute("delete from steps where steps_fp = ?", [fp])
        catalog.insert(con, "steps", rows)
        catalog.record_stage(con, fp, stage="steps", code_version=CODE_VERSION, config=cfg,
                             upstream=[generation["fingerprint"]], summary=summary)
    return summary


# ---- Prefect wrapper ------------------------------------------------------------------------------
from storage.workspace import Workspace  # noqa: E402
from tasks.prefect_stage import stage_task  # noqa: E402


@stage_task("steps")
def split_steps_task(workspace: str, cfg: StepsConfig, teacher_cfg: TeacherConfig, generation: dict,
                     student: dict, fp: str) -> dict:
    return split_rationales(Workspace(workspace).catalog(), cfg, teacher_cfg, generation, student["model_dir"], fp)
