"""Student-init stage: the student model before distillation, as a normal Hugging Face model directory.

Input: `StudentConfig` and the training corpus (questions + kept rationales). Output: `Student`, and
`models/<fp>/` holding config.json, model.safetensors and the tokenizer files (so transformers and vLLM can
load it). `pick_device` resolves `train.device` for every stage that runs a model.

`scratch` builds a tiny Llama-style causal LM and trains a byte-level BPE tokenizer on the corpus with
`tokenizers`; any other value is a Hugging Face causal LM path or hub id, loaded as is.
"""
from __future__ import annotations

import json
from pathlib import Path

from keystep.config import DistillConfig, StudentConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.stage import StageOutput, cached_output
from tasks.teacher import Generation

CODE_VERSION = "1"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


class Student(StageOutput):
    """A student model folder (HF format): the untrained student, or a warmed-up one (tasks/warmup.py)."""
    model_dir: str
    n_params: int
    device: str | None = None     # where it was trained (a warm-up); None for the untrained student


def pick_device(setting: str) -> str:
    """`train.device` -> the device every model stage uses ('auto': CUDA when visible, else CPU)."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'train.device': 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    return "cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_scratch_model(cfg: StudentConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_student(path: str | Path, device: str = "cpu", dtype=None):
    """(model, tokenizer) from an HF directory or hub id; a missing tokenizer pad token falls back to EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as err:
        raise ValueError(f"config key 'student.model': cannot load '{path}' as a Hugging Face causal LM "
                         f"(a local model folder, or a hub id when a network exists): {str(err)[:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def student_lineage(config: DistillConfig, generation: Generation) -> Lineage:
    # a scratch tokenizer is trained on the corpus, so it depends on the generation output; a pretrained
    # model does not
    cfg = config.student
    return Lineage("student", cfg, (generation.fp,) if cfg.model == "scratch" else (), CODE_VERSION)


def training_corpus(ws: Workspace, config: DistillConfig, generation: Generation) -> list[str]:
    """Questions + kept rationales: what a scratch student's tokenizer is trained on."""
    return [f"{r['question']} {r['text']}" for r in ws.catalog().query(
        "kept_rationales", dataset_fp=generation.dataset_fp, teacher_fp=generation.teacher_fp,
        only_correct=config.teacher.keep_only_correct)]


def init_student(ws: Workspace, config: DistillConfig, generation: Generation) -> Student:
    catalog, cfg, lineage = ws.catalog(), config.student, student_lineage(config, generation)
    done = cached_output(catalog, lineage, Student)
    if done and Path(done.model_dir).exists():
        return done
    if cfg.model == "scratch":
        corpus = training_corpus(ws, config, generation)
        if not corpus:
            raise ValueError("student.model 'scratch' needs a corpus to train its tokenizer, but no rationale was "
                             "kept; check teacher.keep_only_correct and the teacher's correctness rate")
        tokenizer = train_tokenizer(corpus, cfg.vocab_size)
        model = build_scratch_model(cfg, tokenizer)
        out_dir = ws.model_dir(lineage.fp)
        tmp = temp_dir_for(out_dir)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "keystep_student.json").write_text(json.dumps(cfg.model_dump(), indent=2))
        publish_dir(tmp, out_dir)
        model_dir, n_params = str(out_dir), sum(p.numel() for p in model.parameters())
    else:
        model, _ = load_student(cfg.model)
        model_dir, n_params = cfg.model, sum(p.numel() for p in model.parameters())
    out = Student(fp=lineage.fp, model_dir=model_dir, n_params=n_params)
    with catalog.transaction() as con:
        catalog.record_stage(con, lineage, out.model_dump())
    return out


# ---- Prefect wrapper ------------------------------------------------------------------------------
from tasks.stage import stage_task, workspace_of  # noqa: E402


@stage_task("student-init", student_lineage)
def init_student_task(config: DistillConfig, generation: Generation) -> Student:
    return init_student(workspace_of(config), config, generation)
