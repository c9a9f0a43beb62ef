"""Evaluate stage: greedy decoding on the evaluation sets, answer extraction, accuracy.

Input: the `Trained` checkpoint (and the untrained `Student` as a baseline), the ingested evaluation `Dataset`s,
`EvalConfig`. Output: `Evaluation`; rows in `eval_results` (accuracy per model, dataset, split, overall and per synthetic
step count) and `predictions` (every output with its extracted answer), under the eval fingerprint.
Decoding is greedy: HF generate batched with left padding (prompts sorted by length so a batch wastes little
padding), or vLLM (tasks/eval_vllm.py) when `eval.backend` picks it — the same prompts' token ids either way.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

from keystep.config import LABEL_FIRST, DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.answers import extract_answer, is_correct
from tasks.curriculum import Curriculum
from tasks.eval_vllm import engine, vllm_generate
from tasks.formats import format_prompt, generation_prompt
from tasks.ingest import Dataset
from tasks.stage import (Made, Stage, StageInputs, StageOutput, artifact_markdown, pyplot, save_figure,
                         workspace_of)
from tasks.student import Student, load_student, pick_device
from tasks.teacher import Generation
from tasks.teacher_scores import TeacherScores
from tasks.training import TRUNCATION_WARN, Trained

CODE_VERSION = "1"


class Evaluation(StageOutput):
    """Accuracy per "model/dataset/split"; rows of `eval_results` and `predictions` under `fp`."""
    n_predictions: int
    accuracy: dict[str, float]
    device: str
    engine: str = "hf"      # hf | vllm (in process) | vllm-server
    curve: dict[int, float] = {}    # epoch -> accuracy on the first eval.curve_questions questions (the learning curve)
    curve_set: str | None = None    # which questions: "<dataset>/<split>, first N"


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device: str,
                    on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([generation_prompt(tokenizer, prompts[i]) for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
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


class EvaluateInputs(StageInputs):
    """The trained student, the untrained one (`eval.include_untrained`) and the evaluation sets."""
    trained: Trained
    student: Student
    datasets: list[Dataset]


def eval_lineage(config: DistillConfig, inputs: EvaluateInputs) -> Lineage:
    what = {"eval": config.eval.fingerprinted(), "engine": engine(config.eval),
            "prompt": config.teacher.prompt_template, "target_format": config.train.target_format,
            "device": config.train.device}
    return Lineage("evaluate", what, (inputs.trained.fp, inputs.student.fp, *[d.fp for d in inputs.datasets]),
                   CODE_VERSION)


def evaluate_student(ws: Workspace, config: DistillConfig, inputs: EvaluateInputs, lineage: Lineage,
                     on_progress: Callable[[str, int, int], None] | None = None) -> Made:
    """The trained student (and, with `eval.include_untrained`, the untrained one) on every evaluation set.
    Label-first target formats decode only the answer sentence (`label_max_new_tokens`) and read its first answer."""
    catalog, cfg, trained = ws.catalog(), config.eval, inputs.trained
    fp, device = lineage.fp, pick_device(config.train.device)
    models = {"student": trained.final_dir}
    if cfg.include_untrained:
        models["untrained"] = inputs.student.model_dir
    examples = [{**ex, "dataset": ds.name, "meta": json.loads(ex["meta_json"] or "{}")}
                for ds in inputs.datasets for ex in catalog.query("examples_of_dataset", dataset_fp=ds.fp)]
    prompts = [format_prompt(config.teacher, ex["question"]) for ex in examples]
    label_first = config.train.target_format in LABEL_FIRST
    preds, decoder = [], engine(cfg)
    max_new_tokens = cfg.label_max_new_tokens if label_first else cfg.max_new_tokens
    for label, path in models.items():
        if decoder == "hf":
            model, tokenizer = load_student(path, device=device)
            outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, cfg.batch_size, device,
                                      on_batch=(lambda d, t, label=label: on_progress(label, d, t)) if on_progress else None)
            del model
        else:
            from transformers import AutoTokenizer
            outputs = vllm_generate(path, AutoTokenizer.from_pretrained(path), prompts, max_new_tokens, cfg,
                                    ws.root / "logs" / f"vllm-eval-{fp}-{label}.log")
            if on_progress:   # vLLM decodes all prompts in one go: the progress moves once per model
                on_progress(label, len(prompts), len(prompts))
        for ex, prompt, out in zip(examples, prompts, outputs):
            extracted = extract_answer(out, ex["answer_type"], first=label_first)
            preds.append({"model_label": label, "dataset": ex["dataset"], "split": ex["split"], "meta": ex["meta"],
                          "example_id": ex["example_id"], "prompt": prompt, "output": out, "extracted": extracted,
                          "gold": ex["answer"],
                          "correct": is_correct(extracted, ex["answer"], ex["answer_type"], cfg.tolerance)})
    results = accuracy_rows(preds)
    final = [p["correct"] for p in preds if p["model_label"] == "student"]     # in `examples` order
    curve, curve_set = epoch_curve(catalog, config, trained, examples, prompts, max_new_tokens, device, label_first,
                                   final)
    out = Evaluation(fp=fp, n_predictions=len(preds), device=device, engine=decoder,
                     accuracy={f"{r['model_label']}/{r['dataset']}/{r['split']}": r["accuracy"]
                               for r in results if r["group_key"] == "all"}, curve=curve, curve_set=curve_set)
    return Made(out, {
        "eval_results": [{"eval_fp": fp, **r} for r in results],
        "predictions": [{"eval_fp": fp, **{k: v for k, v in p.items() if k not in ("meta", "split")}} for p in preds]})


def epoch_curve(catalog, config: DistillConfig, trained: Trained, examples: list[dict], prompts: list[str],
                max_new_tokens: int, device: str, label_first: bool,
                final: list[bool]) -> tuple[dict[int, float], str | None]:
    """The learning curve's evaluation metric: each epoch checkpoint's accuracy on the first `eval.curve_questions`
    questions of the first evaluation set, decoded as the final evaluation decodes them (HF generate). The last epoch
    is the trained student: its point comes from the final evaluation's own answers (`final`, per example)."""
    n = config.eval.curve_questions
    first = [i for i, ex in enumerate(examples) if ex["dataset"] == examples[0]["dataset"]][:n] if examples else []
    if not n or not first:
        return {}, None
    curve = {}
    # the run's epoch checkpoints that still exist (a cached training run may have had old ones removed)
    for ckpt in [c for c in catalog.query("checkpoints_of", train_fp=trained.fp) if Path(c["path"]).is_dir()]:
        if ckpt["epoch"] == trained.epochs:
            curve[ckpt["epoch"]] = sum(final[i] for i in first) / len(first)
            continue
        model, tokenizer = load_student(ckpt["path"], device=device)
        outputs = greedy_generate(model, tokenizer, [prompts[i] for i in first], max_new_tokens,
                                  config.eval.batch_size, device)
        del model
        right = [is_correct(extract_answer(out, examples[i]["answer_type"], first=label_first), examples[i]["answer"],
                            examples[i]["answer_type"], config.eval.tolerance) for i, out in zip(first, outputs)]
        curve[ckpt["epoch"]] = sum(right) / len(right)
    return curve, f"{examples[0]['dataset']}/{examples[0]['split']}, first {len(first)} questions"


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


def teacher_usage(generation: Generation, cached: bool) -> str:
    """What the teacher cost: tokens, cost and speed — for a cached stage '0 new tokens' and what it cost originally."""
    if generation.prompt_tokens + generation.completion_tokens == 0:
        return f"{generation.n} rationales, no teacher calls (reference rationales)" + (" — cached" if cached else "")
    spent = f"{generation.prompt_tokens:,} prompt + {generation.completion_tokens:,} completion tokens" + (
        f", est. cost ${generation.cost_estimate:.4f}" if generation.cost_estimate is not None else "")
    if cached:
        return f"{generation.n} rationales, cached: 0 new tokens (originally {spent})"
    speed = (f", {generation.completion_tokens_per_s:,.0f} completion tok/s" if generation.completion_tokens_per_s
             else "")
    return f"{generation.n} rationales ({generation.n_failed} failed): {spent}{speed}"


def teacher_distributions(config: DistillConfig, scores: TeacherScores | None = None) -> str:
    """What logit distillation trained toward: the scoring teacher, k, its engine, α and τ; with the stage's output,
    how many sequences it scored now, took from generation or found stored, and how sure the teacher is."""
    ts, kd, op = config.teacher_scores, config.train.kd, config.train.on_policy
    said = f"top-{ts.k} of {Path(ts.model).name} ({ts.engine} scoring); " + (
        f"on-policy share λ {op.lmbda}, JSD β {op.beta}, sampling temperature {op.temperature}"
        if config.train.loss == "on_policy" else f"KL weight α {kd.alpha}, temperature τ {kd.temperature}")
    if scores is not None:
        said += (f"; {scores.n_sequences} sequences ({scores.n_scored} scored by this run, {scores.n_reused} from the "
                 f"teacher's logprobs while generating), {scores.bytes_per_position:.0f} B/position")
        if scores.mean_entropy is not None:
            said += (f"; on the supervised tokens mean entropy {scores.mean_entropy:.3f} nats, top-1 probability "
                     f"{scores.mean_top1_prob:.3f}")
    return said


def trained_description(catalog, eval_fp: str | None = None) -> dict | None:
    """What the latest evaluation (or `eval_fp`'s) evaluated, for `keystep results`: the loss, target format, epochs,
    teacher and — for kd / kpod_kd / on_policy — the teacher distributions, from the checkpoint's saved config."""
    rows = catalog.query("latest_trained", eval_fp=eval_fp)
    if not rows:
        return None
    trained = json.loads(rows[0]["summary_json"] or "{}")
    saved = Path(trained.get("final_dir", "")) / "keystep_config.json"
    out = {k: trained.get(k) for k in ("loss", "target_format", "epochs", "final_dir")}
    if saved.is_file():
        config = DistillConfig.model_validate_json(saved.read_text())
        out["teacher"] = (config.teacher.backend if config.teacher.backend == "reference"
                          else f"{config.teacher.backend}: {config.teacher.setting('model')}")
        if config.train.uses_teacher_scores:
            out["teacher distributions"] = teacher_distributions(config)
    return out


def run_header(label: str, config: DistillConfig, results: list[dict], datasets: list[Dataset], trained: Trained,
               n_params: int, wall_s: float, previous: dict | None, teacher: str = "",
               scores: TeacherScores | None = None) -> str:
    """The top of a run's summary: what ran (the teacher's usage among it, and the teacher-scores stage's figures for
    kd), then the headline — the trained student against the untrained one and against the previous run of the same
    preset and loss."""
    train_set, evals = datasets[0], datasets[1:]
    rows = [("preset", label), ("loss", config.train.loss), ("target format", config.train.target_format),
            *([("teacher", teacher)] if teacher else []),
            *([("teacher distributions", teacher_distributions(config, scores))] if config.train.uses_teacher_scores
              else []),
            ("training set", f"{train_set.name}/{train_set.split}, {train_set.n_examples} examples"),
            ("evaluation", ", ".join(f"{d.name}/{d.split} ({d.n_examples})" for d in evals)),
            ("student", f"{config.student.model}, " + (f"{n_params / 1e6:.1f}M" if n_params >= 1e6 else
                                                        f"{n_params / 1e3:.0f}k") + " parameters"),
            ("epochs", str(trained.epochs)), ("device", trained.device), ("wall time", f"{wall_s / 60:.1f} min")]
    lines = [f"# {label}: {config.train.loss} on {train_set.name}", "", "| what ran | |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in rows], "", "## Headline", ""]
    overall = {(r["model_label"], f"{r['dataset']}/{r['split']}"): r["accuracy"] for r in results if r["group_key"] == "all"}
    before = json.loads(previous["summary_json"])["accuracy"] if previous else {}
    for (model, column), acc in overall.items():
        if model != "student":
            continue
        parts = [f"**{column}: {acc:.1%}**"]
        if ("untrained", column) in overall:
            base = overall[("untrained", column)]
            parts.append(f"untrained {base:.1%} ({100 * (acc - base):+.1f} points)")
        if f"student/{column}" in before:
            prev = before[f"student/{column}"]
            parts.append(f"previous {label} run with loss {config.train.loss} {prev:.1%} ({100 * (acc - prev):+.1f} "
                         f"points, {previous['finished_at']:%Y-%m-%d %H:%M})")
        lines.append("- " + "; ".join(parts))
    return "\n".join(lines) + "\n\n"


def summary_markdown(config_name: str, results: list[dict], teacher: Generation, datasets: list[Dataset],
                     train: Trained, plots: dict[str, str] | None = None) -> str:
    """`plots`: name -> PNG path relative to the report."""
    lines = [f"# keystep results: {config_name}", "", "## Accuracy", "", accuracy_markdown(results), "",
             *[f"![{name}]({path})" for name, path in (plots or {}).items()], "",
             "## Teacher", "",
             f"- rationales: {teacher.n} ({teacher.n_failed} failed), correct rate {teacher.correct_rate:.1%}",
             "", "## Data", ""]
    for d in datasets:
        bad = f", rejected {d.n_bad}: {d.bad_reasons}" if d.n_bad else ""
        lines.append(f"- {d.name}/{d.split}: {d.n_examples} examples{bad}")
    hist = train.history
    if hist:
        if train.n_truncated > TRUNCATION_WARN * train.n_examples:
            lines += ["", f"**Warning:** {train.n_truncated} of {train.n_examples} training sequences "
                      f"({train.n_truncated / train.n_examples:.0%}) were cut at student.max_length; their answers "
                      "never reached the loss."]
        lines += ["", "## Training", "", f"- device {train.device}, {train.n_examples} sequences, "
                  f"{train.n_truncated} truncated, resumed from epoch {train.resumed_from_epoch}",
                  f"- loss: {train.loss}"
                  + (", curriculum stage by epoch: " + ", ".join(str(h["stage"]) for h in hist) if hist[0].get("stage") else ""),
                  "- loss by epoch: " + ", ".join(f"{h['loss']:.3f}" for h in hist),
                  f"- final checkpoint: `{train.final_dir}`"]
    return "\n".join(lines) + "\n"


def accuracy_markdown(rows: list[dict]) -> str:
    """The results as a markdown table, accuracies in percent."""
    if not rows:
        return "(no evaluation results yet)"
    lines = ["| dataset | split | group | model | n | correct | accuracy |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        group = "all" if r["group_key"] == "all" else f"{r['group_key']}={r['group_value']}"
        lines.append(f"| {r['dataset']} | {r['split']} | {group} | {r['model_label']} | {r['n']} | {r['n_correct']} | "
                     f"{r['accuracy']:.1%} |")
    return "\n".join(lines)


def summary_plots(results: list[dict], train: Trained, out_dir: Path, curve: dict[int, float] | None = None,
                  curve_set: str | None = None) -> dict[str, str]:
    """PNGs beside the report: accuracy per model and group (all, per step count), and the training loss by epoch
    with the accuracy of each epoch's checkpoint (`curve`, on `curve_set`) beside it."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if results:
        groups = list(dict.fromkeys((r["dataset"], r["split"], r["group_key"], r["group_value"]) for r in results))
        models = list(dict.fromkeys(r["model_label"] for r in results))
        acc = {(r["dataset"], r["split"], r["group_key"], r["group_value"], r["model_label"]): r["accuracy"] for r in results}
        fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups)), 4.5))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            bars = ax.bar([g + i * width for g in range(len(groups))], [100 * acc.get((*k, m), 0.0) for k in groups],
                          width, label=m)
            ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)     # 0% reads as 0.0, not as empty axes
        ax.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))],
                      [f"{d}/{s}" + ("" if k == "all" else f"\n{k}={v}") for d, s, k, v in groups], fontsize=8)
        ax.set_title("Accuracy by evaluation set and step count")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
        paths["accuracy"] = save_figure(fig, out_dir / "accuracy.png")
    if train.history:
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot([h["epoch"] for h in train.history], [h["loss"] for h in train.history], "o-")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"Learning curve ({train.loss})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        if curve:
            acc_ax = ax.twinx()
            epochs = sorted(curve)
            acc_ax.plot(epochs, [100 * curve[e] for e in epochs], "s--", color="tab:green")
            acc_ax.set_ylim(0, 105)
            acc_ax.set_ylabel(f"accuracy (%), {curve_set}", color="tab:green", fontsize=8)
        paths["learning curve"] = save_figure(fig, out_dir / "learning-curve.png")
    return paths


def write_summary(config: DistillConfig, evaluation: Evaluation, generation: Generation, datasets: list[Dataset],
                  trained: Trained, curriculum: Curriculum | None = None) -> str:
    """The run's markdown report, <workspace>/reports/<eval fp>.md, with its plots beside it (accuracy, learning
    curve, and for KPOD runs the curriculum's per-stage table and plots)."""
    ws = workspace_of(config)
    path = ws.report_path(evaluation.fp)
    results = ws.catalog().query("latest_results", eval_fp=evaluation.fp)
    plots = summary_plots(results, trained, path.parent / f"{evaluation.fp}-plots", evaluation.curve,
                          evaluation.curve_set)
    text = summary_markdown(config.data.train.name, results, generation, datasets, trained,
                            {k: str(Path(v).relative_to(path.parent)) for k, v in plots.items()})
    if evaluation.curve:
        text += (f"- accuracy by epoch ({evaluation.curve_set}): "
                 + ", ".join(f"{e}: {a:.1%}" for e, a in sorted(evaluation.curve.items())) + "\n")
    if curriculum:
        text += "\n" + curriculum.markdown
    path.write_text(text)
    return str(path)


EVALUATE = Stage("evaluate", EvaluateInputs, Evaluation, eval_lineage, evaluate_student, tags=["gpu"])


@EVALUATE.in_prefect
def _evaluate_in_prefect(run, config: DistillConfig, inputs: EvaluateInputs, lineage: Lineage) -> Evaluation:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress = create_progress_artifact(0.0, key="eval-progress", description=f"evaluating {lineage.fp}")
    labels = ["student", "untrained"] if config.eval.include_untrained else ["student"]

    def on_progress(label: str, done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * (labels.index(label) + done / total) / len(labels))

    out = run(on_progress=on_progress)
    update_progress_artifact(progress, 100.0)
    return out


def publish_results(config: DistillConfig, evaluation: Evaluation, report: str, header: str = "") -> None:
    """The results table (accuracy in percent) and the report (plots embedded, `header` first: what ran and the
    headline) as artifacts of the calling flow run — the distill run a user starts, or the evaluate flow run alone."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = workspace_of(config).catalog().query("latest_results", eval_fp=evaluation.fp)
    create_table_artifact(key="distill-results", description="Accuracy (%) per model, evaluation set and step count",
                          table=[{"dataset": f"{r['dataset']}/{r['split']}",
                                  "group": "all" if r["group_key"] == "all" else f"{r['group_key']}={r['group_value']}",
                                  "model": r["model_label"], "accuracy": f"{r['accuracy']:.1%}",
                                  "correct": f"{r['n_correct']} of {r['n']}"} for r in rows])
    text = header + Path(report).read_text()
    create_markdown_artifact(key="distill-summary", markdown=artifact_markdown(text, Path(report).parent),
                             description="What ran, accuracy against the untrained student and the previous run, "
                                         f"learning curve (report file {Path(report).name} in the workspace)")
