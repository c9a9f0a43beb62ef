"""Export stage: the distilled dataset as a product — the teacher's rationales out of the catalog, as files.

Input: the `Generation` (its rationales and their examples), and what the prepare phase computed for it when it
ran: `Steps` (char spans), `TokenWeights` (per-token weights, keypoints) and `Difficulty` (per step), with the
`Student` whose tokenizer those token positions index. Output: `Exported`, and one folder:

    README.md                        dataset card: YAML metadata (configs, license, tags) + teacher, prompt template,
                                     sampling parameters, counts by status and reason, filters, fingerprints, lineage
    rationales/train.parquet         one row per rationale (kept only, or all with status and reason); `steps` end
                                     with the answer sentence, `step_difficulty` has one value per reasoning step
    sft/<format>/train.parquet       per target format: prompt, completion and chat messages (TRL's SFTTrainer
                                     layouts), built by tasks/formats.py exactly as keystep trains on them
    hf/rationales/, hf/sft-<format>/  the same as Hugging Face `datasets` folders (`datasets.load_from_disk`; local
                                     only: not pushed to the hub)
    LICENSE.md                       with no `export.license`: whose terms apply (the card's `license: other`)
    export.json                      what was exported (fingerprint, counts, files; no local path)

The folder is written under a temp name and published by rename. The stage's fingerprint is the generation's (and
the prepare outputs it read) plus the export section (less whether it runs in `distill` and the hub upload: its
`operational` fields). Uploading to the hub (`push_to_hub`) is a step after it, never cached.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from keystep.config import ConfigError, DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.difficulty import Difficulty
from tasks.formats import NO_CUT, encode_rationale, format_prompt, format_target, keytoken_text
from tasks.stage import Stage, StageInputs, StageOutput, workspace_of
from tasks.steps import Steps
from tasks.student import Student
from tasks.teacher import Generation
from tasks.teacher_logprobs import load_captured
from tasks.teacher_scores import TeacherScores, scores_by_rationale
from tasks.token_weights import TokenWeights

CODE_VERSION = "2"   # 2: the card as the hub reads it, LICENSE.md, one column schema, no local path in export.json
KEYSTEP_VERSION = "0.1.0"


class Exported(StageOutput):
    """An exported dataset folder."""
    out_dir: str
    n_rows: int
    n_sft: int
    formats: list[str]
    files: dict[str, str]
    with_steps: bool
    with_token_weights: bool
    with_difficulty: bool
    with_teacher_scores: bool = False


class ExportInputs(StageInputs):
    """The rationales, and what the prepare phase made of them (each column's source, when present)."""
    generation: Generation
    student: Student | None = None
    steps: Steps | None = None
    token_weights: TokenWeights | None = None
    difficulty: Difficulty | None = None
    teacher_scores: TeacherScores | None = None


def export_lineage(config: DistillConfig, inputs: ExportInputs) -> Lineage:
    i = inputs
    upstream = [i.generation.fp, *(x.fp for x in (i.student, i.steps, i.token_weights, i.difficulty, i.teacher_scores)
                                       if x)]
    return Lineage("export", config.export.fingerprinted(), tuple(upstream), CODE_VERSION)


def export_dir(ws: Workspace, config: DistillConfig, fp: str) -> Path:
    """`export.out`, or <workspace>/exports/<fp>."""
    return Path(config.export.out).expanduser().resolve() if config.export.out else ws.root / "exports" / fp


def still_exported(config: DistillConfig, done: "Exported") -> bool:
    """A cached export counts only where this config writes it, and while its folder is there."""
    out_dir = export_dir(workspace_of(config), config, done.fp)
    return Path(done.out_dir) == out_dir and (out_dir / "export.json").exists()


def check_export(config: DistillConfig, token_weights: TokenWeights | None = "unknown") -> None:
    """Mistakes an export can know before any work: a push without a token, key tokens without token weights."""
    cfg = config.export
    if cfg.push_to_hub:
        import os
        if not os.environ.get(cfg.hub_token_env):
            raise ConfigError(f"config key 'export.push_to_hub': pushing to '{cfg.push_to_hub}' needs a Hugging Face "
                              f"token in ${cfg.hub_token_env}; set it (or export.hub_token_env), or drop --push-to-hub")
    if cfg.out and Path(cfg.out).expanduser().exists() and not Path(cfg.out).expanduser().is_dir():
        raise ConfigError(f"config key 'export.out' (--out): '{cfg.out}' is a file; the export writes a folder there "
                          "— give a folder path (it is created, or replaced as a whole)")
    if token_weights is None and "label_then_keytokens" in cfg.formats:
        raise ConfigError("config key 'export.formats': label_then_keytokens needs token weights, which this config's "
                          "prepare phase has not computed (set token_weights.compute: true and run it), or drop it")


def rationale_rows(ws: Workspace, config: DistillConfig, inputs: ExportInputs, tokenizer=None) -> list[dict]:
    """One row per rationale: question, gold answer, rationale, extracted answer, correctness, status and reason,
    teacher, prompt, sampling parameters, usage; steps, token weights, keypoints, difficulties and — with the
    student's `tokenizer`, whose token ids they index — the teacher's top-k distributions, where computed."""
    catalog, teacher, generation, steps = ws.catalog(), config.teacher, inputs.generation, inputs.steps
    token_weights, difficulty = inputs.token_weights, inputs.difficulty
    teacher_scores = inputs.teacher_scores if tokenizer is not None else None
    rows = catalog.query("export_rationales", dataset_fp=generation.dataset_fp, teacher_fp=generation.teacher_fp,
                         only_kept=config.export.rows == "kept", only_correct=teacher.keep_only_correct)
    by = lambda q, key, **kw: {r["rationale_id"]: r for r in catalog.query(q, **kw)} if key else {}  # noqa: E731
    step_rows: dict[str, list[dict]] = {}
    for s in (catalog.query("steps_of_rationales", steps_fp=steps.fp) if steps else []):
        step_rows.setdefault(s["rationale_id"], []).append(
            {"text": s["text"], "char_start": s["char_start"], "char_end": s["char_end"]})
    weights = by("token_weights_of", token_weights, token_weights_fp=token_weights.fp if token_weights else None)
    hardness: dict[str, list[float]] = {}
    for d in (catalog.query("difficulty_of", difficulty_fp=difficulty.fp) if difficulty else []):
        hardness.setdefault(d["rationale_id"], []).append(d["difficulty"])
    scored = scores_by_rationale(ws, config, tokenizer, [r for r in rows if r["status"] == "ok" and r["text"]],
                                 teacher_scores) if teacher_scores else {}
    captured = load_captured(catalog, ws.root, [r["rationale_id"] for r in rows])   # teacher.logprobs
    model = teacher.setting("model") or ("reference rationales" if teacher.backend == "reference" else None)
    generated = teacher.backend != "reference"      # reference rationales had no sampling, usage or latency
    out = []
    for r in rows:
        usage = json.loads(r["usage_json"] or "{}")
        row = {"example_id": r["example_id"], "rationale_id": r["rationale_id"], "sample_index": r["sample_index"],
               "split": r["split"], "question": r["question"], "answer": r["answer"], "answer_type": r["answer_type"],
               "rationale": r["text"], "extracted_answer": r["extracted_answer"], "correct": bool(r["correct"]),
               "status": r["status"], "reason": r["reason"], "finish_reason": r["finish_reason"],
               "teacher_backend": teacher.backend, "teacher_model": model, "prompt": r["prompt"],
               "sampling_params": r["params_json"] if generated else None,
               "prompt_tokens": usage.get("prompt_tokens") if generated else None,
               "completion_tokens": usage.get("completion_tokens") if generated else None,
               "latency_s": r["latency_s"] if generated else None}
        if steps:
            row["steps"] = step_rows.get(r["rationale_id"], [])
        if token_weights:
            w = weights.get(r["rationale_id"])
            row["token_weights"] = list(w["weights"]) if w else None
            row["keypoints"] = (keytoken_text(tokenizer, teacher, r, w["token_start"], list(w["keypoints"]))
                                if w and tokenizer is not None else None)
        if difficulty:
            row["step_difficulty"] = hardness.get(r["rationale_id"])
        if teacher_scores:
            ids, topk_ids, topk_lps = scored.get(r["rationale_id"], (None, None, None))
            row |= {"token_ids": ids, "teacher_topk_ids": None if topk_ids is None else topk_ids.tolist(),
                    "teacher_topk_logprobs": None if topk_lps is None else topk_lps.tolist()}
        if captured:
            lp = captured.get(r["rationale_id"])
            row |= {"generated_tokens": lp and lp.tokens, "generated_topk": lp and lp.top,
                    "generated_topk_logprobs": lp and lp.top_logprobs}
        out.append(row)
    return out


# columns that may be empty in one export and filled in another: one type whatever the rows hold
COLUMN_TYPES = {"extracted_answer": "string", "reason": "string", "finish_reason": "string", "teacher_model": "string",
                "sampling_params": "string", "prompt_tokens": "int64", "completion_tokens": "int64",
                "latency_s": "float64", "keypoints": "string"}

# what each rationales column holds (the card's "Columns" section)
COLUMNS = {
    "example_id": "content hash of the question (keystep's example id)",
    "rationale_id": "hash of (teacher fingerprint, example id, sample index)",
    "sample_index": "which of the teacher's samples for the question (0-based)",
    "split": "the source dataset's split", "question": "the question as the teacher saw it",
    "answer": "the gold answer (normalised: numbers as numbers, choices as labels)",
    "answer_type": "number | choice | text", "rationale": "the teacher's chain of thought, as generated",
    "extracted_answer": "the answer read from the rationale", "correct": "extracted answer = gold answer",
    "status": "ok, or failed (a protocol fault or empty text; the raw text is kept)",
    "reason": "why a row failed or was not kept (null when ok)", "finish_reason": "the endpoint's finish reason",
    "teacher_backend": "reference | openai | vllm", "teacher_model": "the teacher model",
    "prompt": "the prompt sent to the teacher",
    "sampling_params": "JSON of the sampling parameters sent (null for the reference teacher)",
    "prompt_tokens": "the endpoint's usage (null for the reference teacher)", "completion_tokens": "idem",
    "latency_s": "seconds the request took (null for the reference teacher)",
    "steps": "the rationale split into steps: text and char span; the last is the answer sentence",
    "token_weights": "KPOD's learned weight per rationale token of the student's tokenizer, in [0, 1]",
    "keypoints": "the top-weighted tokens, in text order",
    "step_difficulty": "KPOD's difficulty per reasoning step (the answer sentence has none)",
    "token_ids": "the student's training sequence, <bos> prompt \" \" rationale answer <eos>, in the student's tokenizer",
    "teacher_topk_ids": "per position j of token_ids but the last, the teacher's k likeliest tokens at j + 1",
    "teacher_topk_logprobs": "their log-probabilities (the teacher's full softmax; stored as float16)",
    "generated_tokens": "teacher.logprobs: the tokens the teacher generated (ids from vLLM, else the endpoint's strings)",
    "generated_topk": "per generated token, the teacher's k likeliest tokens there, as it sampled",
    "generated_topk_logprobs": "their log-probabilities (as the endpoint returned them; stored as float16 for ids)",
}


def typed(table):
    """A `datasets.Dataset` with COLUMN_TYPES applied where a column came out all-null."""
    from datasets import Value

    for col, kind in COLUMN_TYPES.items():
        if col in table.column_names and table.features[col] == Value("null"):
            table = table.cast_column(col, Value(kind))
    return table


def size_category(n: int) -> str:
    """The Hugging Face hub's size_categories bucket of n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def sft_rows(config: DistillConfig, rows: list[dict], fmt: str) -> list[dict]:
    """The kept rationales in one target format, as TRL's SFTTrainer reads them: `prompt` + `completion` (their
    concatenation is exactly keystep's training text for that format, <bos>/<eos> aside) and chat `messages`."""
    teacher, out = config.teacher, []
    for r in rows:
        if r["status"] != "ok" or (teacher.keep_only_correct and not r["correct"]):
            continue
        target = format_target(fmt, r["rationale"], r["answer"], teacher, r.get("keypoints") or "",
                               shuffle_seed=r["rationale_id"])
        prompt = format_prompt(teacher, r["question"])
        out.append({"example_id": r["example_id"], "rationale_id": r["rationale_id"], "format": fmt, "prompt": prompt,
                    "completion": " " + target, "messages": [{"role": "user", "content": prompt},
                                                             {"role": "assistant", "content": target}]})
    return out


def training_text(tokenizer, config: DistillConfig, row: dict, fmt: str, key_text: str = "") -> str:
    """What keystep trains on for `row` in format `fmt`, decoded (for checking an export against training)."""
    target = format_target(fmt, row["text"], row["answer"], config.teacher, key_text, shuffle_seed=row["rationale_id"])
    seq = encode_rationale(tokenizer, config.teacher, row, NO_CUT, target)
    return tokenizer.decode(seq.ids, skip_special_tokens=True)


def dataset_card(config: DistillConfig, generation: Generation, lineage: Lineage, rows: list[dict],
                 formats: list[str], files: dict[str, str]) -> str:
    """README.md with YAML metadata for the Hugging Face hub: where each config's files are, license, tags; then what
    a reader needs to trust and reuse the data."""
    import yaml

    cfg, teacher = config.export, config.teacher
    teacher_model = teacher.setting("model")
    model = teacher_model or "reference"
    source = (f"generated by **{teacher_model}**" if teacher_model else
              "taken from the dataset itself (keystep's reference teacher)")
    name = cfg.pretty_name or f"{config.data.train.name} rationales ({model})"
    configs = [{"config_name": key, "data_files": [{"split": "train", "path": path}], **({"default": True} if i == 0 else {})}
               for i, (key, path) in enumerate(files.items())]
    # the hub wants license_name and license_link with 'other': the source data's and the teacher's terms apply
    license_ = ({"license": cfg.license} if cfg.license else
                {"license": "other", "license_name": "source-and-teacher-terms", "license_link": "LICENSE.md"})
    meta = {**license_, "pretty_name": name, "language": ["en"], "size_categories": [size_category(len(rows))],
            "tags": ["keystep", "chain-of-thought", "distillation", "rationales"],
            "task_categories": ["text-generation"], "configs": configs}
    status = Counter(r["status"] for r in rows)
    reasons = Counter(r["reason"] for r in rows if r["reason"])
    correct = sum(r["correct"] for r in rows)
    params = ({k: teacher.setting(k) for k in ("backend", "model", "api", "temperature", "top_p", "max_tokens", "stop",
                                               "seed", "n_samples")} if teacher.backend != "reference" else None)
    repo = config.export.push_to_hub or "path/to/this/folder"
    columns = [c for c in COLUMNS if not rows or c in rows[0]]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"Chain-of-thought rationales {source} for **{config.data.train.name}** "
             f"({config.data.train.source}), exported by keystep {KEYSTEP_VERSION}.", "",
             "## Contents", "",
             f"- `rationales`: {len(rows)} rows ({'kept only: status ok' + (' and the gold answer' if teacher.keep_only_correct else '') if cfg.rows == 'kept' else 'every rationale, with its status and reason'})."]
    for fmt in formats:
        lines.append(f"- `sft-{fmt}`: the kept rationales as `{fmt}` training targets — `prompt` + `completion` "
                     "(TRL SFTTrainer's prompt-completion layout) and `messages` (its conversational layout).")
    lines += ["", "### Columns of `rationales`", "", "| column | what it holds |", "|---|---|",
              *[f"| `{c}` | {COLUMNS[c]} |" for c in columns], "",
              "The `sft-*` configs: `example_id`, `rationale_id`, `format`, `prompt`, `completion`, `messages`.", "",
              "## How keystep trains on it", "",
              "keystep's student trains on `<bos>` + `prompt` + `completion` + `<eos>` (prompt and completion "
              "concatenated are exactly its training text; loss on the completion only). A student folder keystep "
              "saves adds `<bos>` in its tokenizer, so TRL's SFTTrainer with the prompt-completion layout trains it on "
              "the same tokens. The `messages` layout needs a chat template: keystep writes one into the student "
              "folders it builds, which renders `messages` as that same text; a model with a chat template of its own "
              "renders them differently, so use prompt-completion to reproduce keystep's training.", "",
              "## Generation", "", f"- prompt template: `{teacher.prompt_template!r}`",
              f"- answer sentence: `{teacher.answer_template!r}`",
              (f"- sampling parameters: `{json.dumps(params)}`" if params else
               "- sampling parameters: none — the reference teacher's rationales are the dataset's own (no sampling, "
               "no usage, no latency)"),
              f"- counts by status: {dict(status)}" + (f"; reasons: {dict(reasons)}" if reasons else ""),
              f"- correct (extracted answer = gold): {correct} of {len(rows)}",
              f"- filters: rows = {cfg.rows}; teacher.keep_only_correct = {teacher.keep_only_correct}", "",
              "## Lineage", "", f"- generation fingerprint: `{generation.fp}` (teacher `{generation.teacher_fp}`, "
              f"dataset `{generation.dataset_fp}`)", f"- export fingerprint: `{lineage.fp}` (upstream: "
              + ", ".join(f"`{u}`" for u in lineage.upstream) + ")",
              f"- exported {time.strftime('%Y-%m-%d', time.gmtime())} by keystep {KEYSTEP_VERSION}", "",
              "## License", "", (f"{cfg.license}." if cfg.license else "See LICENSE.md: keystep sets none; the "
                                    "source dataset's license and the teacher's terms of use apply."), "",
              "## Use", "", "```python", "from datasets import load_dataset",
              f"rows = load_dataset({repo!r}, 'rationales', split='train')",
              *([f"sft = load_dataset({repo!r}, 'sft-{formats[0]}', split='train')   # prompt, completion, messages"]
                if formats else []), "```", ""]
    return "\n".join(lines)


def license_note(config: DistillConfig) -> str:
    """LICENSE.md of an export with no `export.license`: what the card's `license: other` refers to."""
    return (f"# License\n\nkeystep sets no license for this export (set `export.license` to a hub license id to state "
            f"one). The questions and answers come from `{config.data.train.source}`: its license applies. The "
            f"rationales come from the teacher ({config.teacher.backend}"
            f"{', ' + config.teacher.setting('model') if config.teacher.setting('model') else ''}): its terms of use "
            "apply to them.\n")


def export_dataset(ws: Workspace, config: DistillConfig, inputs: ExportInputs, lineage: Lineage) -> Exported:
    import datasets

    datasets.disable_progress_bars()
    out_dir, student = export_dir(ws, config, lineage.fp), inputs.student
    check_export(config, inputs.token_weights)
    tokenizer = None
    if (inputs.token_weights or inputs.teacher_scores) and student:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(student.model_dir)
    rows = rationale_rows(ws, config, inputs, tokenizer)
    formats = list(dict.fromkeys(config.export.formats))
    tmp = temp_dir_for(out_dir)
    files, n_sft = {"rationales": "rationales/train.parquet"}, 0
    tables = {"rationales": typed(datasets.Dataset.from_list(rows)) if rows else datasets.Dataset.from_dict({"rationale": []})}
    for fmt in formats:
        sft = sft_rows(config, rows, fmt)
        n_sft += len(sft)
        files[f"sft-{fmt}"] = f"sft/{fmt}/train.parquet"
        tables[f"sft-{fmt}"] = datasets.Dataset.from_list(sft)
    for key, table in tables.items():
        (tmp / files[key]).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(tmp / files[key]))
        table.save_to_disk(str(tmp / "hf" / key))
    (tmp / "README.md").write_text(dataset_card(config, inputs.generation, lineage, rows, formats, files))
    if not config.export.license:
        (tmp / "LICENSE.md").write_text(license_note(config))
    out = Exported(fp=lineage.fp, out_dir=str(out_dir), n_rows=len(rows), n_sft=n_sft, formats=formats, files=files,
                   with_steps=inputs.steps is not None, with_token_weights=inputs.token_weights is not None,
                   with_difficulty=inputs.difficulty is not None,
                   with_teacher_scores=inputs.teacher_scores is not None and tokenizer is not None)
    (tmp / "export.json").write_text(out.model_dump_json(indent=2, exclude={"out_dir"}))   # no local path: it is pushed
    publish_dir(tmp, out_dir)
    return out


EXPORT = Stage("export", ExportInputs, Exported, export_lineage, export_dataset, still_valid=still_exported)


def push_to_hub(config: DistillConfig, exported: Exported) -> str:
    """Upload the export folder to the Hugging Face hub as a dataset repo (its card's YAML names the configs)."""
    import os

    from huggingface_hub import HfApi

    cfg = config.export
    api = HfApi(token=os.environ[cfg.hub_token_env])
    api.create_repo(cfg.push_to_hub, repo_type="dataset", private=cfg.private, exist_ok=True)
    api.upload_folder(folder_path=exported.out_dir, repo_id=cfg.push_to_hub, repo_type="dataset",
                      commit_message=f"keystep export {exported.fp}", ignore_patterns=["hf/**"])   # hf/: local copies
    return f"https://huggingface.co/datasets/{cfg.push_to_hub}"


# ---- in Prefect: the log line and the card as an artifact ------------------------------------------------------
@EXPORT.in_prefect
def _export_in_prefect(run, config: DistillConfig, inputs: ExportInputs, lineage: Lineage) -> Exported:
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    out = run()
    get_run_logger().info("exported %d rationales (%d SFT rows in %s) to %s", out.n_rows, out.n_sft,
                          ", ".join(out.formats) or "no format", out.out_dir)
    create_markdown_artifact(key="dataset-export", markdown=Path(out.out_dir, "README.md").read_text().split("---", 2)[-1],
                             description=f"exported dataset: {out.n_rows} rationales ({out.out_dir})")
    return out

