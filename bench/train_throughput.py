"""Training throughput: keystep's loop against Hugging Face Trainer, the same model, sequences and batches.

Both train one epoch of a config's Std-CoT sequences (default configs/demo.yaml: the CPU demo student) from the
same initial weights: Trainer with padded batches of train.batch_size sequences (DataCollatorForSeq2Seq, its
default optimizer, bf16 on CUDA), keystep with its defaults (packed rows, fused AdamW, bf16 autocast and
torch.compile on CUDA) and, for reference, keystep with packing off. Prints tokens/s (real tokens, no padding) of
each, keystep / Trainer (goal >= 2.0), and on CUDA the MFU (6·N·tokens/s over the GPU's bf16 dense peak). Also
`train.loss: kd` against Std-CoT on the same sequences (issue 30's goal >= 0.8): the top-20 scores of a teacher the
size of the student (the untrained student itself: the cost of the loss does not depend on who scored).

Usage: python bench/train_throughput.py [CONFIG] [key=value ...]   e.g. configs/gsm8k.yaml train.device=cuda
       python bench/train_throughput.py --smoke    (configs/micro.yaml on 32 problems: seconds, for the test suite)
"""
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import load_config, parse_value  # noqa: E402
from storage.fingerprint import Lineage  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import ingest, teacher  # noqa: E402
from tasks.student import STUDENT, StudentInputs, load_student, pick_device  # noqa: E402
from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs  # noqa: E402
from tasks.training import TrainInputs, run_epoch, setup  # noqa: E402

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense, per GPU


def keystep_epoch(ws, cfg, gen, st, scores=None, **train) -> tuple[float, int]:
    tcfg = cfg.train.model_copy(update={"epochs": 1, **train})
    run = setup(ws, Lineage("bench-train", tcfg, (st.fp, str(time.time())), "0"), cfg.model_copy(update={"train": tcfg}),
                TrainInputs(generation=gen, student=st, teacher_scores=scores))
    run_epoch(run, 1)   # warm-up epoch (compile, allocator); the timed one follows with the same order
    t0 = time.perf_counter()
    metrics = run_epoch(run, 1)
    if run.device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()
    return metrics["tokens"] / (time.perf_counter() - t0), metrics["tokens"]


def trainer_epoch(cfg, st, data, device) -> float:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tok = load_student(st.model_dir, device=device)
    ds = Dataset.from_list([{"input_ids": s.ids, "labels": s.labels, "attention_mask": [1] * len(s.ids)} for s in data])
    tc = cfg.train
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=tc.batch_size, num_train_epochs=2,
                                 learning_rate=tc.lr, weight_decay=tc.weight_decay, warmup_steps=tc.warmup_ratio,
                                 max_grad_norm=tc.max_grad_norm, lr_scheduler_type="cosine", logging_steps=10_000,
                                 save_strategy="no", report_to=[], dataloader_num_workers=0, seed=tc.seed,
                                 bf16=device == "cuda", use_cpu=device == "cpu", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        times: list[float] = []

        class EpochTimer(TrainerCallback):
            def on_epoch_begin(self, *args, **kwargs):
                times.append(time.perf_counter())

            def on_epoch_end(self, *args, **kwargs):
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

        trainer.add_callback(EpochTimer())
        trainer.train()
    # the second epoch: warm, like keystep's timed one
    return sum(len(s.ids) for s in data) / (times[3] - times[2])


def main() -> None:
    args = sys.argv[1:]
    config = args.pop(0) if args and args[0].endswith(".yaml") else "configs/micro.yaml" if SMOKE else "configs/demo.yaml"
    overrides = {**({"data.train.n": 32} if SMOKE else {}), **{k: parse_value(v) for k, v in (a.split("=", 1) for a in args)}}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        cfg = load_config(ROOT / config, {**overrides, "storage.workspace": tmp})
        gen = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train))
        st = STUDENT.run(ws, cfg, StudentInputs(generation=gen))
        device = pick_device(cfg.train.device)
        packed, tokens = keystep_epoch(ws, cfg, gen, st)
        padded, _ = keystep_epoch(ws, cfg, gen, st, packing=False)
        cfg = cfg.model_copy(update={"teacher_scores": cfg.teacher_scores.model_copy(update={"model": st.model_dir})})
        scores = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
        kd, _ = keystep_epoch(ws, cfg, gen, st, scores, loss="kd")
        run = setup(ws, Lineage("bench-data", cfg.train, (st.fp,), "0"), cfg, TrainInputs(generation=gen, student=st))
        hf = trainer_epoch(cfg, st, run.data, device)
        n_params = st.n_params
    details = {"config": config, "overrides": overrides, "device": device, "tokens_per_epoch": tokens,
               "params_m": round(n_params / 1e6, 2), "batch_size": cfg.train.batch_size,
               "keystep_packed_tokens_per_s": round(packed), "keystep_padded_tokens_per_s": round(padded),
               "hf_trainer_tokens_per_s": round(hf), "keystep_kd_tokens_per_s": round(kd),
               "kd_over_std_cot": round(kd / packed, 3), "kd_goal": "kd_over_std_cot >= 0.8",
               "teacher_scores_bytes_per_position": round(scores.bytes_per_position, 1)}
    if device == "cuda":
        import torch
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak:
            details["mfu_keystep"] = round(6 * n_params * packed / peak, 4)
            details["mfu_hf_trainer"] = round(6 * n_params * hf / peak, 4)
        details["gpu"] = name
    ratio = packed / hf
    print(json.dumps({"bench": "train_throughput", "metric": "keystep training tokens/s / HF Trainer tokens/s",
                      "value": round(packed), "baseline": round(hf), "ratio": round(ratio, 3), "goal": "ratio >= 2.0",
                      "met": ratio >= 2.0, "details": details}))


if __name__ == "__main__":
    main()
