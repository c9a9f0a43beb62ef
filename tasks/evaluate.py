"""Evaluate stage: greedy decoding on the evaluation sets, answer extraction, accuracy.

Input: the trained checkpoint (and the untrained student as a baseline), ingested evaluation datasets,
`EvalConfig`. Output: rows in `eval_results` (accuracy per model, dataset, split, overall and per synthetic
step count) and `predictions` (every output with its extracted answer), under the eval fingerprint.
Decoding is batched with left padding, prompts sorted by length so a batch wastes little padding.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

from keystep.config import LABEL_FIRST, EvalConfig, TeacherConfig
from storage.fingerprint import fingerprint
from tasks.answers import extract_answer, is_correct
from tasks.student import load_student
from tasks.teacher import format_prompt
from tasks.train import pick_device

CODE_VERSION = "1"


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device: str,
                    on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    bos = tokenizer.bos_token or ""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        # the student was trained on "<bos> prompt target <eos>"; add the BOS the same way here
        enc = tokenizer([bos + prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # never decode past the model's context (a scratch student has a short one)
        room = getattr(model.config, "max_position_embeddings", None)
        new_tokens = max(1, min(max_new_tokens, room - enc["input_ids"].shape[1])) if room else max_new_tokens
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            outputs[i] = text.strip()
        if on_batch:
            on_batch(min(start + batch_size, len(order)), len(order))
    return outputs


def accuracy_rows(preds: list[dict], group_keys=("n_steps",)) -> list[dict]:
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for p in preds:
        groups[(p["model_label"], p["dataset"], p["split"], "all", "all")].append(p["correct"])
        for key in group_keys:
            if p["meta"].get(key) is not None:
                groups[(p["model_label"], p["dataset"], p["split"], key, str(p["meta"][key]))].append(p["correct"])
    return [{"model_label": m, "dataset": d, "split": s, "group_key": k, "group_value": v, "n": len(c),
             "n_correct": sum(c), "accuracy": sum(c) / len(c)} for (m, d, s, k, v), c in groups.items()]


def eval_fingerprint(cfg: EvalConfig, train_fp: str, dataset_fps: list[str], teacher_cfg: TeacherConfig,
                     target_format: str = "cot_then_label") -> str:
    return fingerprint("evaluate", cfg, [train_fp, *dataset_fps], CODE_VERSION,
                       extra={"prompt": teacher_cfg.prompt_template, "target_format": target_format})


def evaluate_student(catalog, cfg: EvalConfig, teacher_cfg: TeacherConfig, models: dict[str, str],
                     datasets: list[dict], fp: str, device_setting: str = "auto",
                     on_progress: Callable[[str, int, int], None] | None = None,
                     target_format: str = "cot_then_label") -> dict:
    """`models` maps a label ('student', 'untrained') to a model dir; `datasets` are ingest summaries.
    Label-first target formats decode only the answer sentence (`label_max_new_tokens`) and read its first answer."""
    done = catalog.stage_output(fp)
    if done:
        return done["summary"]
    device = pick_device(device_setting)
    examples = []
    for ds in datasets:
        for ex in catalog.query("examples_of_dataset", dataset_fp=ds["dataset_fp"]):
            examples.append({**ex, "dataset": ds["name"], "meta": json.loads(ex["meta_json"] or "{}")})
    prompts = [format_prompt(teacher_cfg, ex["question"]) for ex in examples]
    label_first = target_format in LABEL_FIRST
    preds = []
    for label, path in models.items():
        model, tokenizer = load_student(path, device=device)
        outputs = greedy_generate(model, tokenizer, prompts, cfg.label_max_new_tokens if label_first else cfg.max_new_tokens,
                                  cfg.batch_size, device,
                                  on_batch=(lambda d, t, label=label: on_progress(label, d, t)) if on_progress else None)
        del model
        for ex, prompt, out in zip(examples, prompts, outputs):
            extracted = extract_answer(out, ex["answer_type"], first=label_first)
            preds.append({"model_label": label, "dataset": ex["dataset"], "split": ex["split"], "meta": ex["meta"],
                          "example_id": ex["example_id"], "prompt": prompt, "output": out, "extracted": extracted,
                          "gold": ex["answer"],
                          "correct": is_correct(extracted, ex["answer"], ex["answer_type"], cfg.tolerance)})
    results = accuracy_rows(preds)
    summary = {"eval_fp": fp, "n_predictions": len(preds),
               "accuracy": {f"{r['model_label']}/{r['dataset']}/{r['split']}": r["accuracy"]
                            for r in results if r["group_key"] == "all"}}
    with catalog.transaction() as con:
        con.execute("delete from eval_results where eval_fp = ?", [fp])
        con.execute("delete from predictions where eval_fp = ?", [fp])
        catalog.insert(con, "eval_results", [{"eval_fp": fp, **r} for r in results])
        catalog.insert(con, "predictions", [{"eval_fp": fp, **{k: v for k, v in p.items() if k not in ("meta", "split")}}
                                            for p in preds])
        catalog.record_stage(con, fp, stage="evaluate", code_version=CODE_VERSION, config=cfg,
                             upstream=[d["dataset_fp"] for d in datasets], summary=summary)
    return summary


def results_table(rows: list[dict]) -> str:
    """Plain-text results table: accuracy per model, dataset/split and step count."""
    if not rows:
        return "(no evaluation results yet)"
    header = ["dataset", "split", "group", "model", "n", "correct", "accuracy"]
    body = [[r["dataset"], r["split"], "all" if r["group_key"] == "all" else f"{r['group_key']}={r['group_value']}",
             r["model_label"], str(r["n"]), str(r["n_correct"]), f"{r['accuracy']:.1%}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def summary_markdown(config_name: str, results: list[dict], teacher: dict, datasets: list[dict], train: dict) -> str:
    lines = [f"# keystep results: {config_name}", "", "## Accuracy", "", "```", results_table(results), "```", "",
             "## Teacher", "",
             f"- rationales: {teacher['n']} ({teacher['n_failed']} failed), correct rate {teacher['correct_rate']:.1%}",
             "", "## Data", ""]
    for d in datasets:
        bad = f", rejected {d['n_bad']}: {d['bad_reasons']}" if d["n_bad"] else ""
        lines.append(f"- {d['name']}/{d['split']}: {d['n_examples']} examples{bad}")
    hist = train.get("history", [])
    if hist:
        lines += ["", "## Training", "", f"- device {train['device']}, {train['n_examples']} sequences, "
                  f"{train['n_truncated']} truncated, resumed from epoch {train['resumed_from_epoch']}",
                  f"- loss: {train.get('loss', 'std_cot')}"
                  + (", curriculum stage by epoch: " + ", ".join(str(h["stage"]) for h in hist) if hist[0].get("stage") else ""),
                  "- loss by epoch: " + ", ".join(f"{h['loss']:.3f}" for h in hist),
                  f"- final checkpoint: `{train['final_dir']}`"]
    return "\n".join(lines) + "\n"


# ---- Prefect wrapper ------------------------------------------------------------------------------
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from storage.workspace import Workspace  # noqa: E402
from tasks.prefect_stage import stage_task  # noqa: E402


@stage_task("evaluate", tags=["gpu"])
def evaluate_task(workspace: str, cfg: EvalConfig, teacher_cfg: TeacherConfig, train: dict, student: dict,
                  datasets: list[dict], fp: str, device: str = "auto", target_format: str = "cot_then_label") -> dict:
    ws = Workspace(workspace)
    models = {"student": train["final_dir"]}
    if cfg.include_untrained:
        models["untrained"] = student["model_dir"]
    progress = create_progress_artifact(0.0, key="eval-progress", description=f"evaluating {fp}")
    labels = list(models)

    def on_progress(label: str, done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * (labels.index(label) + done / total) / len(labels))

    summary = evaluate_student(ws.catalog(), cfg, teacher_cfg, models, datasets, fp, device, on_progress, target_format)
    rows = ws.catalog().query("latest_results", eval_fp=fp)
    create_table_artifact(key="distill-results", table=[{**r, "accuracy": round(r["accuracy"], 4)} for r in rows],
                          description="Accuracy per model, dataset, split and synthetic step count")
    return summary


def publish_summary(workspace: str, name: str, eval_fp: str, teacher: dict, datasets: list[dict], train: dict,
                    curriculum: dict | None = None) -> str:
    """The run's markdown report (<workspace>/reports/<eval fp>.md, also a Prefect artifact); for KPOD runs it
    includes the curriculum's per-stage table and plots (PNG files beside the report)."""
    ws = Workspace(workspace)
    text = summary_markdown(name, ws.catalog().query("latest_results", eval_fp=eval_fp), teacher, datasets, train)
    if curriculum:
        text += "\n" + curriculum["markdown"]
    path = ws.report_path(eval_fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    create_markdown_artifact(key="distill-summary", markdown=text, description=f"report: {path}")
    return str(path)
