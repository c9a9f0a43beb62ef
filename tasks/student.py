"""Student-init stage: the student model before distillation, as a normal Hugging Face model directory.

Input: `StudentConfig` and the training corpus (questions + kept rationales). Output: `Student`, and
`models/<fp>/` holding config.json, model.safetensors and the tokenizer files (so transformers and vLLM can
load it). `pick_device` resolves `train.device` for every stage that runs a model.

`scratch` builds a tiny Llama-style causal LM and trains a byte-level BPE tokenizer on the corpus with
`tokenizers`; any other value is a Hugging Face causal LM path or hub id, loaded as is.

Also the student as the model stages hold it: `load_student` (a model folder, or a peft LoRA adapter folder onto its
base), `build_model` (training's copy: precision, LoRA/QLoRA adapters through peft, activation checkpointing),
`merge_adapter` (a LoRA checkpoint as a plain model folder) and `training_memory_gib` (the estimate the preflight
and the README's 7B figure use).
"""
from __future__ import annotations

import json
from pathlib import Path

from keystep.config import DistillConfig, LoraConfig, StudentConfig, TrainConfig
from storage.fingerprint import Lineage, file_hash
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.formats import standalone_tokenizer
from tasks.stage import Stage, StageInputs, StageOutput, kept_rationales
from tasks.teacher import Generation

CODE_VERSION = "2"   # 2: the folder's tokenizer adds <bos> itself; a scratch model's context is 2 x max_length
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


def tokenizer_folder(setting: str) -> Path:
    """`student.tokenizer`: a model folder, or a preset (`.yaml`) — the folder of the scratch student it makes, found
    by its fingerprint (its lineage only: nothing runs, so `keystep run <preset>` must have made it)."""
    if not setting.endswith((".yaml", ".yml")):
        return Path(setting).expanduser()
    from keystep.config import load_config
    from tasks.ingest import Dataset, IngestInputs, dataset_lineage
    from tasks.teacher import GenerateInputs, generation_lineage

    cfg = load_config(setting)
    dataset = Dataset.model_construct(fp=dataset_lineage(cfg, IngestInputs(spec=cfg.data.train)).fp)
    generation = Generation.model_construct(fp=generation_lineage(cfg, GenerateInputs(dataset=dataset)).fp)
    fp = student_lineage(cfg, StudentInputs(generation=generation)).fp
    return Path(cfg.storage.workspace).expanduser().resolve() / "models" / fp


def build_scratch_model(cfg: StudentConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    # the context holds a prompt as long as a training sequence plus as long a generation (RoPE: no weights depend on
    # it), so clients that size prompt + generation by it (lm-eval) never cut a prompt keystep would not
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=2 * cfg.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def adapter_config(path: str | Path) -> dict | None:
    """A peft LoRA adapter folder's adapter_config.json (its base and rank); None for a plain model folder."""
    p = Path(path) / "adapter_config.json"
    return json.loads(p.read_text()) if p.exists() else None


def weights_folder(path: str | Path) -> str:
    """Where a student's base weights are: the adapter's base for an adapter folder, else the folder itself."""
    adapter = adapter_config(path)
    return adapter["base_model_name_or_path"] if adapter else str(path)


def load_student(path: str | Path, device: str = "cpu", dtype=None, quantization=None):
    """(model, tokenizer) from an HF directory or hub id — or a peft LoRA adapter folder, loaded onto the base its
    adapter_config.json names; a missing tokenizer pad token falls back to EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_config(path)
    base = weights_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, quantization_config=quantization,
                                                     **({"device_map": device} if quantization else {}))
    except OSError as err:
        raise ValueError(f"config key 'student.model': cannot load '{base}' as a Hugging Face causal LM "
                         f"(a local model folder, or a hub id when a network exists): {str(err)[:200]}") from None
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if quantization else model.to(device)), tokenizer


# ---- the student as training holds it ---------------------------------------------------------------------
def resolve_precision(precision: str, device: str) -> str:
    return ("bf16-mixed" if device.startswith("cuda") else "fp32") if precision == "auto" else precision


def attention_kernel(setting: str, device: str) -> str:
    """`train.attention` -> a transformers attn_implementation."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(cfg: TrainConfig, lora: LoraConfig | None, student: Student, device: str, resume_dir: Path | None):
    """(model, tokenizer): the student (or the checkpoint `resume_dir`) in the run's precision; with `lora`
    (`student.lora`) the base frozen (NF4 with quantize: 4bit) and peft LoRA adapters on it (fp32, restored from
    `resume_dir`)."""
    import torch

    precision = resolve_precision(cfg.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    if lora is None:
        model, tokenizer = load_student(resume_dir or student.model_dir, device=device, dtype=dtype)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        quantization = None
        if lora.quantize == "4bit":
            from transformers import BitsAndBytesConfig
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)
        model, tokenizer = load_student(student.model_dir, device=device, dtype=dtype, quantization=quantization)
        if quantization:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(cfg.seed)   # the adapters' initialisation
        model = (PeftModel.from_pretrained(model, str(resume_dir), is_trainable=True) if resume_dir else
                 get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                  target_modules=lora.target_modules, task_type="CAUSAL_LM")))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()   # adapters train in fp32 whatever the base's dtype
    model.set_attn_implementation(attention_kernel(cfg.attention, device))
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def training_memory_gib(model_config, config: DistillConfig) -> dict[str, float]:
    """A training run's GPU memory by part (GiB), from the model's shape and the train/student settings: weights,
    what the optimizer trains (gradients + AdamW's two moments, fp32), activations (Korthikanti et al. 2022: ~34·h
    bytes per token and layer in 16 bits without attention scores — SDPA/flash keep none; with checkpointing only
    each layer's input, plus one layer recomputed) and the logits (bf16, their fp32 copy and its gradient)."""
    import torch

    from transformers import AutoModelForCausalLM

    cfg, lora = config.train, config.student.lora
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                                 task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = 0.56 if lora and lora.quantize == "4bit" else 2 if cfg.precision == "bf16" else 4   # NF4 + scales
    weight_bytes = frozen_bytes if lora else (2 if cfg.precision == "bf16" else 4)
    tokens = cfg.tokens_per_batch or cfg.batch_size * config.student.max_length
    h, layers, vocab = model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size
    act_bytes = 4 if cfg.precision == "fp32" else 2
    per_layer = 34 * h * tokens * act_bytes / 2
    gib = 2 ** 30
    return {"params_b": n_params / 1e9, "trainable_m": trainable / 1e6,
            "weights": (n_params - (trainable if lora else 0)) * weight_bytes / gib + (trainable * 4 / gib if lora else 0),
            "optimizer": trainable * (4 + 8) / gib,
            "activations": ((tokens * h * act_bytes * layers + per_layer) if cfg.gradient_checkpointing
                            else per_layer * layers) / gib,
            "logits": tokens * vocab * (act_bytes + 4 + 4) / gib}


def merge_adapter(adapter_dir: Path, out_dir: Path) -> None:
    """A LoRA checkpoint merged into its (unquantized) base, saved as a plain HF model folder that evaluation and
    vLLM load like any student."""
    model, tokenizer = load_student(adapter_dir, dtype="auto")
    tmp = temp_dir_for(out_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp)
    standalone_tokenizer(tokenizer, merged.config.max_position_embeddings).save_pretrained(tmp)
    publish_dir(tmp, out_dir)


class StudentInputs(StageInputs):
    """The teacher's rationales: a scratch student's tokenizer is trained on them."""
    generation: Generation


def student_lineage(config: DistillConfig, inputs: StudentInputs) -> Lineage:
    # a scratch tokenizer is trained on the corpus, so it depends on the generation output; a pretrained
    # model does not
    cfg = config.student.model_copy(update={"lora": None})   # adapters are the training stage's business
    if cfg.tokenizer:   # a given tokenizer: what it is, not where it lies, and no corpus
        return Lineage("student", cfg.model_copy(update={"tokenizer": "given"}), (), CODE_VERSION,
                       {"tokenizer": file_hash(tokenizer_folder(cfg.tokenizer) / "tokenizer.json")})
    return Lineage("student", cfg, (inputs.generation.fp,) if cfg.model == "scratch" else (), CODE_VERSION)


def student_folder(ws: Workspace, config: DistillConfig, fp: str) -> str:
    """Where the student before distillation lies: a scratch one in the workspace, a pretrained one where given."""
    return str(ws.model_dir(fp)) if config.student.model == "scratch" else config.student.model


def init_student(ws: Workspace, config: DistillConfig, inputs: StudentInputs, lineage: Lineage) -> Student:
    cfg = config.student
    if cfg.model == "scratch":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(cfg.tokenizer))) if cfg.tokenizer else None
        corpus = [] if tokenizer else [f"{r['question']} {r['text']}"     # questions + kept rationales
                                       for r in kept_rationales(ws.catalog(), config, inputs.generation)]
        if not tokenizer and not corpus:
            raise ValueError("student.model 'scratch' needs a corpus to train its tokenizer, but no rationale was "
                             "kept; check teacher.keep_only_correct and the teacher's correctness rate")
        tokenizer = tokenizer or train_tokenizer(corpus, cfg.vocab_size)
        model = build_scratch_model(cfg, tokenizer)
        out_dir = Path(student_folder(ws, config, lineage.fp))
        tmp = temp_dir_for(out_dir)
        model.save_pretrained(tmp)
        standalone_tokenizer(tokenizer, model.config.max_position_embeddings).save_pretrained(tmp)
        (tmp / "keystep_student.json").write_text(json.dumps(cfg.model_dump(), indent=2))
        publish_dir(tmp, out_dir)
    else:
        model, _ = load_student(cfg.model)
    return Student(fp=lineage.fp, model_dir=student_folder(ws, config, lineage.fp),
                   n_params=sum(p.numel() for p in model.parameters()))


STUDENT = Stage("student", StudentInputs, Student, student_lineage, init_student,
                still_valid=lambda config, done: Path(done.model_dir).exists())
