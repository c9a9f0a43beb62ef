"""LoRA / QLoRA students (peft): adapter checkpoints, a merged model evaluation loads, exact resume."""
import json

import pytest
import torch

from storage.workspace import Workspace
from tasks.student import load_student
from tasks.train import train_lineage, TRAIN
from tasks.training import TrainInputs, last_whole_epoch
from tests.tasks.helpers import prepared
from tests.tasks.test_train import Killed, train_killable

LORA = {"student.lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "train.lr": 0.01}


def test_lora_trains_adapters_only_and_writes_a_merged_student(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=32, **{"train.epochs": 2, **LORA})
    out = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    epoch = ws.checkpoints_root(out.fp) / "epoch-2"
    adapter = json.loads((epoch / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == st.model_dir
    assert not (epoch / "model.safetensors").exists()            # an epoch holds the adapter, not a model copy
    assert out.final_dir == str(epoch / "merged")
    base, tok = load_student(st.model_dir)
    merged, _ = load_student(out.final_dir)
    assert not hasattr(merged, "peft_config")                     # a plain HF model folder (what vLLM serves)
    with_adapter, _ = load_student(epoch)                          # the adapter folder loads onto its base too
    ids = torch.tensor([tok("1 + 2 = 3. The answer is 3")["input_ids"]])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (base, merged, with_adapter))
    assert not torch.allclose(a, b, atol=1e-4)                     # training changed the model ...
    assert torch.allclose(b, c, atol=1e-4)                         # ... and merging kept what the adapter does
    assert out.history[-1]["loss"] < out.history[0]["loss"]


def test_lora_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    runs = {}
    for name, kill in (("full", None), ("killed", 1)):
        ws = Workspace(tmp_path / name)
        cfg, cat, gen, st = prepared(ws, n=32, **{"train.epochs": 3, **LORA})
        if kill:
            with pytest.raises(Killed):
                train_killable(ws, cfg, cat, gen, st, kill_after=kill)
            assert last_whole_epoch(ws.checkpoints_root(train_lineage(cfg, TrainInputs(
                generation=gen, student=st)).fp)) == 1
        runs[name] = train_killable(ws, cfg, cat, gen, st)
    full, resumed = runs["full"], runs["killed"]
    assert resumed.resumed_from_epoch == 1
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    a = load_student(full.final_dir)[0].state_dict()
    b = load_student(resumed.final_dir)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_qlora_trains_on_a_4bit_base(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=32, **{"train.epochs": 2, "student.lora": {"r": 4, "quantize": "4bit"},
                                              "train.lr": 0.01})
    out = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    assert all(h["loss"] == h["loss"] for h in out.history)       # finite
    merged, tok = load_student(out.final_dir)
    assert merged.dtype in (torch.float32, torch.bfloat16) and not hasattr(merged, "peft_config")


def test_the_7b_preset_runs_its_settings_on_a_tiny_llama(tmp_path):
    """configs/gsm8k-lora-7b.yaml as it is — LoRA, bf16 base, gradient checkpointing, packing, batches by tokens —
    on a tiny random Llama and synthetic data; and its memory estimate for a LLaMA-7B shape fits one 80 GB GPU."""
    from transformers import LlamaConfig

    from keystep.config import load_config
    from tasks import ingest, teacher
    from tasks.evaluate import EVALUATE, EvaluateInputs
    from tasks.student import STUDENT, StudentInputs, training_memory_gib
    from tests.conftest import ROOT
    from tests.vllm_model import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "tiny-llama")
    synthetic = {"name": "synthetic", "source": "synthetic:arith", "max_steps": 2, "max_operand": 9}
    cfg = load_config(ROOT / "configs" / "gsm8k-lora-7b.yaml", {
        "data.train": {**synthetic, "n": 48, "seed": 0}, "data.eval": [{**synthetic, "split": "test", "n": 8, "seed": 1}],
        "student.model": str(model_dir), "train.epochs": 1, "train.tokens_per_batch": 1024, "train.pack_length": 512,
        "train.device": "cpu", "eval.max_new_tokens": 16, "storage.workspace": str(tmp_path / "ws")})
    assert cfg.student.lora and cfg.train.precision == "bf16" and cfg.train.gradient_checkpointing and cfg.train.packing
    ws = Workspace(tmp_path / "ws")
    gen = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train))
    st = STUDENT.run(ws, cfg, StudentInputs(generation=gen))
    out = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    assert out.history[0]["loss"] == out.history[0]["loss"] and len(out.history) == 1
    saved = json.loads((ws.checkpoints_root(out.fp) / "epoch-1" / "keystep_config.json").read_text())
    assert saved["train"]["precision"] == "bf16" and saved["student"]["lora"]["r"] == 16
    ev = EVALUATE.run(ws, cfg, EvaluateInputs(
        trained=out, student=st, datasets=[ingest.ingest(ws, spec) for spec in cfg.data.eval]))
    assert ev.engine == "hf" and ev.n_predictions == 16                 # student + untrained, 8 each

    llama_7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32)
    gib = training_memory_gib(llama_7b, load_config(ROOT / "configs" / "gsm8k-lora-7b.yaml"))
    total = gib["weights"] + gib["optimizer"] + gib["activations"] + gib["logits"]
    assert gib["trainable_m"] == pytest.approx(39.98, abs=0.01)        # r=16 on all 7 linear layers of 32 blocks
    assert total == pytest.approx(24.1, abs=0.2) and total < 80 * 0.9    # the README's figure; fits one 80 GB GPU
