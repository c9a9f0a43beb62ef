"""What KPOD's training actually sees on synthetic:arith (issue: KPOD below its Std-CoT baseline).

Runs the prepare phase of configs/kpod.yaml (the demo's data, teacher and student) as plain functions and reports:
1. the learned token weights by token role (the generator's key marks): the step's copied value, operator, operand,
   "=", result; the lead-in copy of the operand ("Losing 6, ..."); other (filler) words; the last rationale tokens
   before the answer sentence;
2. tokens each arm supervises per epoch — Std-CoT (every target token) against KPOD (the tokens after the
   curriculum's input prefix; also Σ w, what the weighted loss sums), and the fraction of examples with an input
   prefix at each stage;
3. the effective loss scale of the weighted loss: mean w over a sequence's supervised tokens.

Prints one JSON line: value = KPOD's weighted supervised tokens over all epochs, baseline = Std-CoT's.
Usage: python bench/kpod_diagnosis.py [N_TRAIN] [section.key=value ...] [--workspace DIR]
       --smoke: 32 problems, the micro student, one epoch of each module (seconds, for the test suite)
"""
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = "--smoke" in sys.argv   # tiny sizes, seconds: what the test suite runs (tests/test_bench_smoke.py)
if SMOKE:
    sys.argv.remove("--smoke")

from keystep.config import load_config, parse_value  # noqa: E402
# what --smoke changes in a KPOD config: the micro student, one epoch of every module
SMOKE_SETTINGS = {"student.hidden_size": 32, "student.num_layers": 1, "student.num_heads": 2,
                  "student.intermediate_size": 64, "student.max_length": 256, "train.epochs": 2,
                  "token_weights.epochs": 1, "token_weights.predictor_warmup_epochs": 1,
                  "difficulty.warmup_epochs": 1} if SMOKE else {}
from storage.workspace import Workspace  # noqa: E402
from tasks import curriculum, difficulty, ingest, steps, student, teacher, token_weights  # noqa: E402
from tasks.formats import IGNORE, encode_rationale  # noqa: E402
from tasks.training import CurriculumSequences  # noqa: E402
from tasks.warmup import warm_up_student  # noqa: E402

ROLES = ["value", "operator", "operand", "equals", "result"]   # the generator's 5 key spans per step, in order


def token_roles(tok, item, key_spans: list[list[int]]) -> list[str]:
    """Role of each rationale token of `item` (see the module docstring)."""
    roles = []
    for j in range(item.rationale_start, item.rationale_end):
        a, b = item.char_spans[j]
        text = tok.decode([item.ids[j]])
        a += len(text) - len(text.lstrip())                       # a byte-level token carries its leading space
        hit = [k for k, (s, e) in enumerate(key_spans) if a < e and b > s]
        if hit:
            roles.append(ROLES[hit[0] % 5])
        elif any(c.isdigit() for c in text):
            roles.append("lead-in number")
        else:
            roles.append("other")
    for j in range(max(0, len(roles) - 3), len(roles)):
        roles[j] = "last 3 before answer" if roles[j] == "other" else roles[j]
    return roles


def describe(values: list[float]) -> dict:
    qs = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return {"n": len(values), "mean": round(statistics.fmean(values), 3), "p10": round(qs[0], 3),
            "median": round(statistics.median(values), 3), "p90": round(qs[-1], 3),
            "share_ge_0.5": round(sum(v >= 0.5 for v in values) / len(values), 3)}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--workspace")]
    ws_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workspace=")), None)
    n_train = int(args[0]) if args and "=" not in args[0] else 32 if SMOKE else 2000
    overrides = {**SMOKE_SETTINGS, **{k: parse_value(v) for k, _, v in (a.partition("=") for a in args if "=" in a)}}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(ws_arg or tmp)
        cfg = load_config(ROOT / "configs" / "kpod.yaml", {"data.train.n": n_train, "storage.workspace": str(ws.root),
                                                            **overrides})
        train_ds = ingest.ingest(ws, cfg.data.train)
        gen = teacher.generate_rationales(ws, cfg, train_ds)
        st = student.STUDENT.run(ws, cfg, student.StudentInputs(generation=gen))
        stp = steps.STEPS.run(ws, cfg, steps.StepsInputs(generation=gen, student=st))
        tw = token_weights.TOKEN_WEIGHTS.run(ws, cfg, token_weights.TokenWeightsInputs(
            generation=gen, steps=stp, predictor=warm_up_student(ws, cfg, gen, st, cfg.predictor_warmup_epochs)))
        dif = difficulty.DIFFICULTY.run(ws, cfg, difficulty.DifficultyInputs(
            generation=gen, steps=stp, token_weights=tw,
            scorer=warm_up_student(ws, cfg, gen, st, cfg.scorer_warmup_epochs)))
        cur = curriculum.CURRICULUM.run(ws, cfg, curriculum.CurriculumInputs(generation=gen, difficulty=dif))
        cat = ws.catalog()
        _, tok = student.load_student(st.model_dir)
        rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
        meta = {r["example_id"]: json.loads(r["meta_json"]) for r in cat.query("examples_of_dataset", dataset_fp=train_ds.fp)}
        _, items = token_weights.load_encoded(ws, cfg, tok, gen, stp)
        weights = token_weights.load_weights(cat, tw)
        by_role: dict[str, list[float]] = defaultdict(list)
        ex_of = {r["rationale_id"]: r["example_id"] for r in rows}
        for it in items:
            for role, w in zip(token_roles(tok, it, meta[ex_of[it.rationale_id]]["key_spans"]), weights[it.rationale_id][1]):
                by_role[role].append(w)

        # supervised tokens per epoch: Std-CoT vs KPOD's curriculum stage of that epoch
        std_tokens = sum(sum(lab != IGNORE for lab in encode_rationale(tok, cfg.teacher, r, cfg.student.max_length).labels)
                         for r in rows)
        data = CurriculumSequences(cat, tok, cfg.teacher, cfg.train, cfg.student.max_length, rows, stp, tw, cur)
        per_epoch, scale = [], []
        for epoch in range(1, cfg.train.epochs + 1):
            seqs = data.sequences(epoch)
            supervised = sum(s.supervised for s in seqs)
            weighted = sum(sum(w for lab, w in zip(s.labels[1:], s.weights[1:]) if lab != IGNORE) for s in seqs)
            prefix = curriculum.curriculum_shard(cur.shards_dir, data.curriculum_stage(epoch))
            per_epoch.append({"epoch": epoch, "stage": data.curriculum_stage(epoch), "std_cot_tokens": std_tokens,
                              "kpod_tokens": supervised, "kpod_weighted_tokens": round(weighted, 1),
                              "share_with_prefix": round(sum(v > 0 for v in prefix.values()) / len(prefix), 3),
                              "mean_prefix_steps": round(statistics.fmean(prefix.values()), 3)})
            if epoch == cfg.train.epochs:
                scale = [statistics.fmean(w for lab, w in zip(s.labels[1:], s.weights[1:]) if lab != IGNORE) for s in seqs]
    total_std = sum(e["std_cot_tokens"] for e in per_epoch)
    total_kpod = sum(e["kpod_weighted_tokens"] for e in per_epoch)
    print(json.dumps({"bench": "kpod_diagnosis", "metric": "weighted supervised tokens over all epochs, KPOD",
                      "value": round(total_kpod), "baseline": total_std, "ratio": round(total_kpod / total_std, 3),
                      "goal": "diagnosis (no goal): KPOD's loss sees this fraction of Std-CoT's supervision", "met": None,
                      "details": {"n_train": len(rows), "overrides": overrides, "token_weights": {
                          "kept_fraction": tw.kept_fraction, "mean_weight": tw.mean_weight, "collapsed": tw.collapsed,
                          "by_role": {k: describe(v) for k, v in sorted(by_role.items())}},
                          "loss_scale_mean_w_over_supervised": describe(scale),
                          "curriculum": {"budget": [round(x, 1) for x in cur.budget],
                                         "achieved": [round(x, 1) for x in cur.achieved],
                                         "start_achieved": round(cur.start_achieved, 1), "mean_prefix": cur.mean_prefix},
                          "per_epoch": per_epoch}}))


if __name__ == "__main__":
    main()
