"""Answer normalisation, extraction and comparison, shared by ingest, teacher and evaluation.

Numbers become floats ("9 (apples)" -> 9, "$1,000.50" -> 1000.5, "3/4" -> 0.75), choices become labels,
text is compared case- and space-insensitively. Extraction from a generated rationale prefers the answer
phrase ("the answer is X"), else the last number (or choice label).
"""
from __future__ import annotations

import math
import re

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(NUMBER)
_ANSWER_PHRASE = re.compile(r"answer is[:\s]*(.+?)(?:\.\s*$|\.\s|\n|$)", re.IGNORECASE)
_CHOICE_RE = re.compile(r"\(?\b([A-E])\b\)?")


def parse_number(text: str | float | int | None) -> float | None:
    """The first number in `text` as a float, or None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return None if isinstance(text, float) and math.isnan(text) else float(text)
    m = _NUMBER_RE.search(str(text))
    if not m:
        return None
    tok = m.group(0).replace("$", "").replace(",", "")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            return float(num) / float(den) if float(den) else None
        return float(tok)
    except ValueError:
        return None


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def normalise(raw, answer_type: str) -> tuple[str, float | None]:
    """(canonical answer string, numeric value or None); raises ValueError if it cannot be parsed."""
    if answer_type == "number":
        value = parse_number(raw)
        if value is None:
            raise ValueError(f"no number in answer {raw!r}")
        return format_number(value), value
    text = str(raw).strip() if raw is not None else ""
    if not text:
        raise ValueError("empty answer")
    if answer_type == "choice":
        m = _CHOICE_RE.search(text.upper())
        if not m:
            raise ValueError(f"no choice label (A-E) in answer {raw!r}")
        return m.group(1), None
    return " ".join(text.lower().split()), None


def extract_answer(text: str, answer_type: str = "number", first: bool = False) -> str | None:
    """The answer a rationale states: the last 'answer is X' phrase, else the last number / label.
    `first` (label-first target formats, where the answer comes before the rationale): the first ones."""
    if not text:
        return None
    phrases = _ANSWER_PHRASE.findall(text)
    candidates = [phrases[0] if first else phrases[-1]] if phrases else []
    if answer_type == "number":
        candidates.append(text)
        for cand in candidates:
            nums = _NUMBER_RE.findall(cand)
            if nums:
                # inside the phrase take the first number, in free text the last one
                pick = nums[0] if cand is not text or first else nums[-1]
                value = parse_number(pick)
                if value is not None:
                    return format_number(value)
        return None
    if answer_type == "choice":
        for cand in candidates + [text]:
            labels = _CHOICE_RE.findall(cand.upper())
            if labels:
                return labels[0] if cand is not text or first else labels[-1]
        return None
    return " ".join(candidates[0].lower().split()) if candidates else None


def is_correct(predicted: str | None, gold: str, answer_type: str = "number", tolerance: float = 1e-4) -> bool:
    if predicted is None:
        return False
    if answer_type == "number":
        p, g = parse_number(predicted), parse_number(gold)
        if p is None or g is None:
            return False
        return math.isclose(p, g, rel_tol=tolerance, abs_tol=tolerance)
    return predicted.strip().lower() == str(gold).strip().lower()
