"""Ingest stage: load a dataset into canonical examples in the catalog.

Input: a `DatasetSpec` (synthetic:arith | gsm8k | svamp | file | hub). Output: `Dataset`; rows in `datasets`,
`examples` and `bad_rows` under the dataset fingerprint (which includes the file's content hash, so an
edited file is a new dataset version). Bad rows (empty question, missing/unparseable answer, duplicate)
are counted per reason, stored with their raw text and reported; nothing is dropped silently.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from keystep.config import ConfigError, DatasetSpec, DistillConfig
from storage.fingerprint import Lineage, content_hash, file_hash
from storage.workspace import Workspace
from tasks.stage import Made, Stage, StageInputs, StageOutput
from tasks.answers import normalise

CODE_VERSION = "1"


@dataclass
class Example:
    question: str
    answer: str
    answer_value: float | None
    answer_type: str
    reference_rationale: str | None = None
    choices: list[list[str]] | None = None   # [label, text] pairs
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def example_id(self) -> str:
        return content_hash(self.question.strip() + "\n" + self.answer)


# --------------------------------------------------------------------------------------------------
# synthetic:arith — multi-step arithmetic word problems with ground-truth key tokens
# --------------------------------------------------------------------------------------------------
NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Lily", "Noah"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells"]
# question phrase, rationale lead-in; {n} is the operand
ADD = [("{p} buys {n} more {item}.", "After buying {n} more"), ("{p} finds {n} more {item}.", "Finding {n} more"),
       ("A friend gives {p} {n} {item}.", "With the {n} from a friend")]
SUB = [("{p} gives away {n} {item}.", "After giving away {n}"), ("{p} loses {n} {item}.", "Losing {n}"),
       ("{p} sells {n} {item}.", "After selling {n}")]
MUL = [("Then the number of {item} becomes {n} times as large.", "Growing {n} times"),
       ("{p} ends up with {n} times as many {item}.", "With {n} times as many")]
FILLER = ["so {p} now has", "which means {p} has", "so the total is", "leaving"]
OPS = {"+": ADD, "-": SUB, "*": MUL}


def _digits(x: int) -> int:
    return len(str(abs(x)))


def _one_problem(rng: random.Random, n_steps: int, max_operand: int) -> Example:
    person, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_operand)
    q_parts = [f"{person} has {value} {item}."]
    sentences: list[tuple[str, list[tuple[int, int]]]] = []  # (sentence, key spans within it)
    complexities = []
    for _ in range(n_steps):
        choices = ["+", "-"] + (["*"] if value <= 12 else [])
        op = rng.choice(choices)
        if op == "+":
            n = rng.randint(1, max_operand)
            result = value + n
        elif op == "-":
            if value < 2:
                op, n, result = "+", rng.randint(1, max_operand), None
                result = value + n
            else:
                n = rng.randint(1, value - 1)
                result = value - n
        else:
            n = rng.randint(2, 4)
            result = value * n
        q_tpl, r_tpl = rng.choice(OPS[op])
        q_parts.append(q_tpl.format(p=person, n=n, item=item))
        lead = r_tpl.format(n=n)
        filler = rng.choice(FILLER).format(p=person)
        sym = {"+": "+", "-": "-", "*": "x"}[op]
        eq = f"{value} {sym} {n} = {result}"
        sentence = f"{lead}, {filler} {eq} {item}."
        eq_at = sentence.index(eq)
        spans, pos = [], eq_at
        for tok in eq.split(" "):  # operands, operator, '=', result are the key tokens
            spans.append((pos, pos + len(tok)))
            pos += len(tok) + 1
        sentences.append((sentence, spans))
        complexities.append(_digits(value) + _digits(n) + _digits(result) + (2 if op == "*" else 0))
        value = result
    q_parts.append(f"How many {item} does {person} have now?")
    rationale, key_spans = "", []
    for sentence, spans in sentences:
        offset = len(rationale) + (1 if rationale else 0)
        rationale = f"{rationale} {sentence}" if rationale else sentence
        key_spans += [[offset + a, offset + b] for a, b in spans]
    return Example(question=" ".join(q_parts), answer=str(value), answer_value=float(value), answer_type="number",
                   reference_rationale=rationale,
                   meta={"n_steps": n_steps, "key_spans": key_spans, "step_complexity": complexities})


def generate_arith(n: int, seed: int, min_steps: int = 1, max_steps: int = 5, max_operand: int = 20) -> list[Example]:
    """Deterministic: the same arguments give the same problems in the same order."""
    rng = random.Random(f"arith-{seed}")
    seen, out, attempts = set(), [], 0
    while len(out) < n and attempts < 50 * n:
        attempts += 1
        ex = _one_problem(rng, rng.randint(min_steps, max_steps), max_operand)
        if ex.question in seen:
            continue
        seen.add(ex.question)
        out.append(ex)
    return out


# --------------------------------------------------------------------------------------------------
# file loaders: each yields (row_index, raw_row_dict) and lets `canonicalise` judge the row
# --------------------------------------------------------------------------------------------------
_CALC_MARK = re.compile(r"<<[^<>]*>>")


def _read_records(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path) as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as err:
                    yield i, _BadRecord(f"invalid JSON: {err.msg}", line.strip())
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"file '{path}' is not valid JSON (line {err.lineno}: {err.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise ConfigError(f"file '{path}' must hold a JSON list of records")
        yield from enumerate(data)
    elif suffix == ".csv":
        with open(path, newline="") as fh:
            yield from enumerate(csv.DictReader(fh))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from enumerate(pq.read_table(path).to_pylist())
    else:
        raise ConfigError(f"file '{path}': unsupported format '{suffix}'; use .jsonl, .json, .csv or .parquet")


@dataclass
class _BadRecord:
    reason: str
    raw: str


def _gsm8k_row(row: dict) -> dict:
    text = str(row.get("answer", ""))
    rationale, _, final = text.rpartition("####")
    if not _:
        return {"question": row.get("question"), "answer": None, "rationale": None}
    rationale = _CALC_MARK.sub("", rationale).strip()
    return {"question": row.get("question"), "answer": final.strip(), "rationale": rationale}


def _svamp_row(row: dict) -> dict:
    body, q = str(row.get("Body", "")).strip(), str(row.get("Question", "")).strip()
    if body and not body.endswith((".", "?", "!")):
        body += "."
    return {"question": f"{body} {q}".strip(), "answer": row.get("Answer"), "rationale": None}


def _field(row: dict, key: str):
    """A column, or a nested key as a.b (CommonsenseQA's jsonl keeps the question under question.stem)."""
    value = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class _MissingColumn(ValueError):
    pass


class _Columns(dict):
    def __missing__(self, key):
        raise _MissingColumn(key)


def labelled_choices(raw) -> list[tuple[str, str]] | None:
    """Choices in any of the usual layouts -> [(label, text)]: {label: [...], text: [...]} (the hub's
    CommonsenseQA), [{label, text}] (its jsonl), or [text, ...] (labelled A, B, ...)."""
    if isinstance(raw, dict) and "text" in raw:
        labels = raw.get("label") or [chr(65 + i) for i in range(len(raw["text"]))]
        return [(str(a).strip(), str(t).strip()) for a, t in zip(labels, raw["text"])]
    if isinstance(raw, (list, tuple)) and raw:
        if all(isinstance(c, dict) and "text" in c for c in raw):
            return [(str(c.get("label") or chr(65 + i)).strip(), str(c["text"]).strip()) for i, c in enumerate(raw)]
        return [(chr(65 + i), str(c).strip()) for i, c in enumerate(raw)]
    return None


def with_choices(question: str, choices: list[tuple[str, str]]) -> str:
    """The question as the teacher and the student read it: its choices listed after it (zero-shot CoT's layout)."""
    return question + "\nAnswer Choices: " + " ".join(f"({label}) {text}" for label, text in choices)


def _mapped_row(spec: DatasetSpec, row: dict) -> dict:
    if spec.question_template:
        question = spec.question_template.format_map(_Columns({k: ("" if v is None else v) for k, v in row.items()}))
    else:
        question = _field(row, spec.question_field)
    return {"question": question, "answer": _field(row, spec.answer_field),
            "rationale": _field(row, spec.rationale_field) if spec.rationale_field else None,
            "choices": labelled_choices(_field(row, spec.choices_field)) if spec.choices_field else None}


def _hub_records(spec: DatasetSpec) -> Iterator[tuple[int, Any]]:
    import datasets  # only needed for hub sources
    try:
        if Path(spec.path).exists():  # a local dataset folder (data files or save_to_disk output)
            p = Path(spec.path)
            ds = (datasets.load_from_disk(str(p)) if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                  else datasets.load_dataset(str(p), split=spec.split))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as err:  # noqa: BLE001 - any loader failure is a user-facing config problem
        raise ConfigError(f"config key 'data.*.path': cannot load hub dataset '{spec.path}' split "
                          f"'{spec.split}': {type(err).__name__}: {str(err)[:200]}") from None
    yield from enumerate(ds)


def canonicalise(spec: DatasetSpec, records) -> tuple[list[Example], list[dict]]:
    """Turn raw records into Examples; every rejected row becomes a bad-row record with its reason."""
    examples, bad, seen = [], [], set()
    for idx, raw in records:
        if not isinstance(raw, _BadRecord) and spec.limit is not None and len(examples) >= spec.limit:
            break
        judged = raw if isinstance(raw, _BadRecord) else _example(spec, idx, raw)
        if isinstance(judged, Example) and judged.example_id in seen:
            judged = _BadRecord("duplicate", json.dumps(raw, default=str))
        if isinstance(judged, _BadRecord):
            bad.append({"row_index": idx, "reason": judged.reason, "raw": judged.raw[:2000]})
        else:
            seen.add(judged.example_id)
            examples.append(judged)
    return examples, bad


def _example(spec: DatasetSpec, idx: int, raw) -> Example | _BadRecord:
    """One record as an Example, or why it is rejected (with its raw text)."""
    if not isinstance(raw, dict):
        return _BadRecord("not a record", str(raw))
    raw_text = json.dumps(raw, default=str)
    try:
        row = {"gsm8k": _gsm8k_row, "svamp": _svamp_row}.get(spec.source, lambda r: _mapped_row(spec, r))(raw)
    except _MissingColumn as err:
        return _BadRecord(f"missing column {err.args[0]!r} (question_template)", raw_text)
    question = str(row.get("question") or "").strip()
    if not question:
        return _BadRecord("empty question", raw_text)
    if row.get("answer") is None or str(row.get("answer")).strip() == "":
        return _BadRecord("missing answer", raw_text)
    answer_type = "number" if spec.source in ("gsm8k", "svamp") else spec.answer_type
    try:
        answer, value = normalise(row["answer"], answer_type)
    except ValueError as err:
        return _BadRecord(f"unparseable answer ({err})", raw_text)
    choices = row.get("choices")
    if spec.choices_field and not choices:
        return _BadRecord(f"no choices in '{spec.choices_field}'", raw_text)
    if choices:
        if answer not in {label.upper() for label, _ in choices}:
            return _BadRecord(f"answer {answer!r} is not a choice label", raw_text)
        question = with_choices(question, choices)
    return Example(question=question, answer=answer, answer_value=value, answer_type=answer_type,
                   reference_rationale=(str(row["rationale"]).strip() or None) if row.get("rationale") else None,
                   choices=[[label, text] for label, text in choices] if choices else None, meta={"row_index": idx})


def load_examples(spec: DatasetSpec) -> tuple[list[Example], list[dict]]:
    if spec.source == "synthetic:arith":
        exs = generate_arith(spec.n, spec.seed, spec.min_steps, spec.max_steps, spec.max_operand)
        return exs[: spec.limit] if spec.limit else exs, []
    if spec.source == "hub":
        return canonicalise(spec, _hub_records(spec))
    path = Path(spec.path)
    if not path.is_file():
        raise ConfigError(f"config key 'data.*.path': file '{path}' (dataset '{spec.name}') not found")
    return canonicalise(spec, _read_records(path))


class Dataset(StageOutput):
    """An ingested dataset version: its examples are rows of `examples` under `fp`."""
    name: str
    split: str
    n_examples: int
    n_bad: int
    bad_reasons: dict[str, int]


class IngestInputs(StageInputs):
    """A dataset spec (one of the config's `data` entries) and, for an evaluation set, the training set it must not
    overlap."""
    spec: DatasetSpec
    exclude: Dataset | None = None


def dataset_lineage(config: DistillConfig | None, inputs: IngestInputs) -> Lineage:
    """Includes the file's content hash, so an edited file is a new dataset version; an evaluation set depends on
    the training set it must not overlap (`exclude`)."""
    spec, extra = inputs.spec, {}
    if spec.source in ("gsm8k", "svamp", "file", "hub") and spec.path and Path(spec.path).exists():
        extra["content"] = file_hash(spec.path)
    return Lineage("ingest", spec.fingerprinted(), (inputs.exclude.fp,) if inputs.exclude else (), CODE_VERSION, extra)


def ingest_spec(ws: Workspace, config: DistillConfig | None, inputs: IngestInputs, lineage: Lineage) -> Made:
    """Load the spec and write it to the catalog; examples of `exclude` (the training set, for an evaluation set)
    are reported as 'overlaps training set' rather than silently evaluated on."""
    catalog, fp, spec, exclude = ws.catalog(), lineage.fp, inputs.spec, inputs.exclude
    examples, bad = load_examples(spec)
    if exclude:
        exclude_ids = {r["example_id"] for r in catalog.query("examples_of_dataset", dataset_fp=exclude.fp)}
        bad += [{"row_index": ex.meta.get("row_index", -1), "reason": "overlaps training set", "raw": ex.question[:2000]}
                for ex in examples if ex.example_id in exclude_ids]
        examples = [ex for ex in examples if ex.example_id not in exclude_ids]
    reasons = Counter(b["reason"].split(" (")[0] for b in bad)
    rows = [{"dataset_fp": fp, "example_id": ex.example_id, "row_index": i, "question": ex.question,
             "answer": ex.answer, "answer_value": ex.answer_value, "answer_type": ex.answer_type,
             "choices_json": json.dumps(ex.choices) if ex.choices else None,
             "reference_rationale": ex.reference_rationale, "source": spec.source, "split": spec.split,
             "meta_json": json.dumps(ex.meta)} for i, ex in enumerate(examples)]
    out = Dataset(fp=fp, name=spec.name, split=spec.split, n_examples=len(rows), n_bad=len(bad),
                  bad_reasons=dict(reasons))
    return Made(out, {
        "examples": rows, "bad_rows": [{"dataset_fp": fp, **b} for b in bad],
        "datasets": [{"dataset_fp": fp, "name": spec.name, "source": spec.source, "path": getattr(spec, "path", None),
                      "split": spec.split,
                      "content_hash": content_hash(json.dumps([r["example_id"] for r in rows])),
                      "n_examples": len(rows), "n_bad": len(bad), "bad_reasons_json": json.dumps(dict(reasons))}]})


INGEST = Stage("ingest", IngestInputs, Dataset, dataset_lineage, ingest_spec)


def ingest(ws: Workspace, spec: DatasetSpec, exclude: Dataset | None = None) -> Dataset:
    """The ingest stage outside a flow (it reads no config beyond the spec)."""
    return INGEST.run(ws, None, IngestInputs(spec=spec, exclude=exclude))


@INGEST.in_prefect
def _ingest_in_prefect(run, config: DistillConfig, inputs: IngestInputs, lineage: Lineage) -> Dataset:
    from prefect import get_run_logger

    out, spec = run(), inputs.spec
    logger = get_run_logger()
    logger.info("dataset %s/%s: %d examples", spec.name, spec.split, out.n_examples)
    if out.n_bad:
        logger.warning("dataset %s/%s: %d rows rejected %s (stored in table bad_rows, dataset_fp=%s)",
                       spec.name, spec.split, out.n_bad, out.bad_reasons, out.fp)
    return out
