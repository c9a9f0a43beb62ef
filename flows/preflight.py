"""Pre-flight: the user mistakes that can be found before any work starts, each as one `ConfigError` that names the
config key or path and what to do. The CLI runs it before Prefect starts; the distill flow runs it first too, so a
deployment run fails in seconds, not after the teacher was paid.

Checked: the workspace is a writable folder; the device asked for exists; every dataset file is there (a file, not a
folder), parses in its format and has valid rows (else: the file, the rejection reasons and the columns it has); no
evaluation set lies wholly inside the training set; the reference
teacher has reference rationales to read; a student given as a folder loads; the teacher endpoint answers
(`/models`; `check_teacher=False` skips it).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from keystep.config import ConfigError, DatasetSpec, DistillConfig, StudentConfig, TeacherConfig, TeacherScoresConfig
from tasks.ingest import load_examples


def check_workspace(path: str) -> None:
    ws = Path(path).expanduser()
    if ws.exists() and not ws.is_dir():
        raise ConfigError(f"config key 'storage.workspace': '{ws}' is a file, not a folder; pass --workspace DIR")
    existing = next(p for p in [ws, *ws.resolve().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"config key 'storage.workspace': '{existing}' is not writable; pass --workspace DIR")


def check_device(setting: str) -> None:
    if setting == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("config key 'train.device': 'cuda' requested but no CUDA device is visible; "
                              "use 'auto' or 'cpu'")


def _columns(path: Path) -> str:
    """The columns of a file's first record, for an error message."""
    from tasks.ingest import _read_records

    try:
        for _, record in _read_records(path):
            return ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
    except Exception:  # noqa: BLE001 - only for the message
        pass
    return "none"


def check_dataset(key: str, spec: DatasetSpec) -> list:
    """The dataset's valid examples (empty for sources that need a network); raises for a file that cannot be used."""
    if spec.source == "synthetic:arith":
        return load_examples(spec)[0]
    if spec.source == "hub" and not Path(spec.path).exists():
        return []
    path = Path(spec.path)
    if spec.source != "hub" and path.is_dir():
        raise ConfigError(f"config key '{key}.path': '{spec.path}' is a directory, not a dataset file; name the file "
                          "(jsonl, json, csv or parquet) inside it")
    if spec.source != "hub" and not path.is_file():
        raise ConfigError(f"config key '{key}.path': file '{spec.path}' not found (cwd {Path.cwd()})")
    try:
        examples, bad = load_examples(spec)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a file that its reader cannot parse is the user's to fix
        raise ConfigError(f"config key '{key}.path': '{spec.path}' cannot be read as {path.suffix or spec.source} "
                          f"({type(err).__name__}: {str(err)[:150]})") from None
    if not examples:
        reasons = dict(Counter(b["reason"].split(" (")[0] for b in bad)) or {"the file is empty": 1}
        raise ConfigError(f"config key '{key}': '{spec.path}' has no valid row; rejected: {reasons}; its columns: "
                          f"{_columns(path)}; set {key}.question_field / answer_field (or question_template) to its columns")
    return examples


def check_overlap(key: str, spec: DatasetSpec, examples: list, train: list) -> None:
    """An evaluation set whose every question is also in the training set would be dropped row by row at ingest
    (each counted as 'overlaps training set') and leave nothing to evaluate: say so before any work."""
    if not examples or not train:
        return
    seen = {ex.example_id for ex in train}
    overlap = sum(ex.example_id in seen for ex in examples)
    if overlap == len(examples):
        raise ConfigError(f"config key '{key}': all {overlap} rows of evaluation set '{spec.name}/{spec.split}' are also "
                          "in the training set (data.train), so nothing would be left to evaluate; evaluate on other "
                          "data (for synthetic:arith another seed)")


def check_reference_rationales(spec: DatasetSpec, examples: list) -> None:
    """The reference teacher reads the dataset's own rationales: they must be there."""
    if spec.source == "synthetic:arith" or (spec.source == "hub" and not examples):
        return
    if not any(ex.reference_rationale for ex in examples):
        hint = ("set data.train.rationale_field to the column holding them" if spec.source in ("file", "hub")
                else f"{spec.source} has none")
        raise ConfigError(f"config key 'teacher.backend': 'reference' reads the training set's own rationales, but "
                          f"'{spec.path}' has none ({hint}); or use a teacher that writes them (backend openai / vllm)")


def check_student(model: str, tokenizer: str | None = None) -> None:
    if tokenizer:
        from tasks.student import tokenizer_folder

        folder = tokenizer_folder(tokenizer)
        if not (folder / "tokenizer.json").is_file():
            made = f" (`keystep run {tokenizer}` makes it)" if tokenizer.endswith((".yaml", ".yml")) else ""
            raise ConfigError(f"config key 'student.tokenizer': no tokenizer.json in '{folder}'{made}; give a model "
                              "folder or a preset whose scratch student's tokenizer to share")
    if model == "scratch":
        return
    path = Path(model).expanduser()
    if not path.exists():
        if model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]:
            raise ConfigError(f"config key 'student.model': folder '{model}' not found")
        return   # a hub id: loaded where a network exists
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - any failure: not a model folder
        raise ConfigError(f"config key 'student.model': '{model}' is not a Hugging Face model folder "
                          f"({type(err).__name__}: {str(err)[:150]})") from None


def check_scoring_engine(cfg: TeacherScoresConfig) -> None:
    """engine vllm needs a vLLM to ask: a server's URL, or a vLLM environment to start one from."""
    if cfg.engine != "vllm" or cfg.server_url:
        return
    if not cfg.vllm_python:
        raise ConfigError("config key 'teacher_scores.vllm_python': engine vllm needs the Python of a vLLM environment "
                          "to serve the teacher (e.g. .venv-vllm/bin/python, `make test-vllm` builds it), or "
                          "teacher_scores.server_url of a running vLLM server; or use engine: local")
    if not Path(cfg.vllm_python).is_file():
        raise ConfigError(f"config key 'teacher_scores.vllm_python': '{cfg.vllm_python}' not found (the Python of a "
                          "vLLM environment, e.g. .venv-vllm/bin/python)")


def check_scoring_teacher(model: str, student: StudentConfig) -> None:
    """A scoring teacher is a model folder sharing the student's tokenizer (checked here when the student's is
    known before the run: a model folder, or student.tokenizer; else by the teacher-scores stage)."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ConfigError(f"config key 'teacher_scores.model': '{model}' is no model folder with config.json and "
                          "tokenizer.json; give the teacher's folder (e.g. the last epoch of configs/teacher-arith.yaml)")
    from tasks.student import tokenizer_folder
    from tasks.teacher_scores import check_same_tokenizer

    known = tokenizer_folder(student.tokenizer) if student.tokenizer else (
        Path(student.model).expanduser() if student.model != "scratch" else None)
    if known and (known / "tokenizer.json").is_file():
        try:
            check_same_tokenizer(str(known), str(path))
        except ValueError as err:
            raise ConfigError(str(err)) from None


def check_teacher(cfg: TeacherConfig) -> None:
    """An OpenAI-compatible endpoint answers `GET /models` (any HTTP answer counts: authentication is its own matter)."""
    if cfg.backend == "openai":
        import httpx

        url = cfg.base_url.rstrip("/") + "/models"
        key = os.environ.get(cfg.api_key_env) if not cfg.api_key_secret else None
        headers = {"Authorization": f"Bearer {key}"} if key else None
        try:
            httpx.get(url, timeout=10, headers=headers)
        except httpx.HTTPError as err:
            raise ConfigError(f"config key 'teacher.base_url': the teacher endpoint {cfg.base_url} does not answer "
                              f"({type(err).__name__}); start it or fix the URL (--no-check-teacher skips this check)") from None
        if cfg.api == "batch":
            files = httpx.get(cfg.base_url.rstrip("/") + "/batches", params={"limit": 1}, timeout=10, headers=headers)
            if files.status_code in (404, 405, 501):
                raise ConfigError(f"config key 'teacher.api': 'batch' needs the OpenAI files and batches API, which the "
                                  f"teacher endpoint {cfg.base_url} does not implement (GET /batches answered "
                                  f"{files.status_code}); use teacher.api: completions (or chat) there")
    elif cfg.backend == "vllm" and cfg.vllm_python and not Path(cfg.vllm_python).is_file():
        raise ConfigError(f"config key 'teacher.vllm_python': '{cfg.vllm_python}' not found (the Python of a vLLM "
                          "environment, e.g. .venv-vllm/bin/python from `make test-vllm`)")


def check_training(config: DistillConfig) -> None:
    """Processes, the evaluation engine and — for a model folder on a GPU — the training memory estimate."""
    from tasks.eval_vllm import engine

    cfg = config.train
    if cfg.num_processes > 1 and cfg.device != "cpu":
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() < cfg.num_processes:
            raise ConfigError(f"config key 'train.num_processes': {cfg.num_processes} processes need as many GPUs, but "
                              f"{torch.cuda.device_count()} are visible; lower it or expose more GPUs")
    if config.eval.vllm_python and not Path(config.eval.vllm_python).is_file():
        raise ConfigError(f"config key 'eval.vllm_python': '{config.eval.vllm_python}' not found (the Python of a vLLM "
                          "environment, e.g. .venv-vllm/bin/python from `make test-vllm`)")
    try:
        engine(config.eval)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    path = Path(config.student.model).expanduser()
    if path.is_dir() and cfg.device != "cpu":
        import torch
        if torch.cuda.is_available():
            from transformers import AutoConfig

            from tasks.student import training_memory_gib
            parts = training_memory_gib(AutoConfig.from_pretrained(str(path)), config)
            need = sum(v for k, v in parts.items() if k not in ("params_b", "trainable_m")) / max(
                1, cfg.num_processes if cfg.strategy == "fsdp" else 1)
            have = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
            if need > have:
                raise ConfigError(f"config key 'train': training this {parts['params_b']:.1f}B student needs about "
                                  f"{need:.0f} GiB per GPU, more than the {have:.0f} GiB here; set student.lora, "
                                  "train.gradient_checkpointing: true, train.precision: bf16 or a smaller "
                                  "train.tokens_per_batch (configs/gsm8k-lora-7b.yaml shows a 7B setup)")


def preflight(config: DistillConfig, check_teacher_endpoint: bool = True) -> None:
    check_workspace(config.storage.workspace)
    check_device(config.train.device)
    train = check_dataset("data.train", config.data.train)
    for i, spec in enumerate(config.data.eval):
        check_overlap(f"data.eval[{i}]", spec, check_dataset(f"data.eval[{i}]", spec), train)
    if config.teacher.backend == "reference":
        check_reference_rationales(config.data.train, train)
    check_student(config.student.model, config.student.tokenizer)
    if config.teacher_scores.model:
        check_scoring_engine(config.teacher_scores)
        check_scoring_teacher(config.teacher_scores.model, config.student)
    check_training(config)
    if config.export.enabled:
        from tasks.export import check_export
        check_export(config)
    if check_teacher_endpoint:
        check_teacher(config.teacher)
