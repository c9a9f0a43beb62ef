"""Token-weight and step-difficulty quality on synthetic:arith (KPOD §4.1-4.2).

1. ROC-AUC of the learned token weights on *held-out* rationales against the generator's ground-truth key-token
   marks (operands, operators, results); beside it a uniform scorer (0.5) and a digits-only heuristic.
   Goal >= 0.85.
2. Spearman correlation between step difficulty (§4.2, on the training rationales) and the generator's step
   complexity. Goal >= 0.3. Beside it, the same scoring model with other weightings (`spearman_references`):
   eq. 7 with the ground-truth key marks as 0/1 weights, the plain mean NLL, the result token's NLL alone.
3. The mean learned weight by token role (the generator's key marks; bench/kpod_diagnosis.py's roles).
Runs configs/kpod.yaml's settings; the held-out rationales are a validation set (generator seed 2), not a test set.
Usage: python bench/token_weights.py [N_TRAIN] [section.key=value ...] [--workspace=DIR]
       --smoke: 32 problems, the micro student, one epoch of each module (seconds, for the test suite)
"""
import json
import statistics
import sys
from collections import defaultdict
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import load_config  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import difficulty, ingest, steps, student, teacher, token_weights  # noqa: E402
from tasks.warmup import warm_up_student  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from kpod_diagnosis import SMOKE, SMOKE_SETTINGS, token_roles  # noqa: E402   (it takes --smoke off argv)

VALIDATION_SEED = 2


def generated(ws, cfg, spec):
    dataset = ingest.ingest(ws, spec)
    return dataset, teacher.generate_rationales(ws, cfg, dataset)


def key_marks(tok, it, spans) -> list[int]:
    """Per rationale token of `it`: 1 when it overlaps a ground-truth key span of the generator."""
    marks = []
    for j in range(it.rationale_start, it.rationale_end):
        a, b = it.char_spans[j]
        text = tok.decode([it.ids[j]])
        a += len(text) - len(text.lstrip())  # ignore the leading space a byte-level token carries
        marks.append(int(any(a < e and b > s for s, e in spans)))
    return marks


def difficulty_references(ws, cfg, gen, train_steps, st, train_meta, rid_to_ex) -> dict:
    """Spearman(step score, step complexity) for the same scoring model with other token weightings — to tell
    how much of the gap to the goal is the learned weights and how much the scoring model: eq. 7 with the
    generator's ground-truth key marks as 0/1 weights (what perfect masks would give), the plain mean NLL, and
    the NLL of the step's result token alone."""
    from scipy.stats import spearmanr

    device = student.pick_device(cfg.train.device)  # as the difficulty stage scores: like is compared with like
    scorer = warm_up_student(ws, cfg, gen, st, cfg.difficulty.warmup_epochs)
    model, tok = student.load_student(scorer.model_dir, device=device)
    _, items = token_weights.load_encoded(ws, cfg, tok, gen, train_steps)
    nll = difficulty.token_nll(model, items, cfg.difficulty.batch_tokens, device)
    scores = {"eq7_ground_truth_marks": [], "mean_nll": [], "result_token_nll": []}
    comp = []
    for it, losses in zip(items, nll):
        meta = train_meta[rid_to_ex[it.rationale_id]]
        marks = [float(m) for m in key_marks(tok, it, meta["key_spans"])]
        truth = difficulty.step_difficulties(it, losses, marks, True)
        plain = difficulty.step_difficulties(it, losses, None, False)
        for k, (a, b) in enumerate(difficulty.step_token_spans(it)):
            marked = [j for j in range(a, b) if marks[j - it.rationale_start]]
            if k >= len(meta["step_complexity"]) or not marked:
                continue
            comp.append(meta["step_complexity"][k])
            scores["eq7_ground_truth_marks"].append(truth[k][0])
            scores["mean_nll"].append(plain[k][0])
            scores["result_token_nll"].append(losses[marked[-1] - 1])  # the last marked token: the step's result
    return {name: round(float(spearmanr(v, comp).statistic), 4) for name, v in scores.items()}


def main() -> None:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from keystep.config import parse_value

    args = [a for a in sys.argv[1:] if not a.startswith("--workspace=")]
    ws_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workspace=")), None)
    n_train = int(args[0]) if args and "=" not in args[0] else 32 if SMOKE else 1000
    overrides = {**SMOKE_SETTINGS, **{k: parse_value(v) for k, _, v in (a.partition("=") for a in args if "=" in a)}}
    cfg = load_config(ROOT / "configs" / "kpod.yaml", {"data.train.n": n_train, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(ws_arg or tmp)   # a kept workspace reuses the warm-ups across settings
        cat = ws.catalog()
        train_ds, gen = generated(ws, cfg, cfg.data.train)
        # held out: a validation set (its own generator seed), not the test set the studies report on
        test_ds, tgen = generated(ws, cfg, cfg.data.eval[0].model_copy(update={"seed": VALIDATION_SEED}))
        st = student.STUDENT.run(ws, cfg, student.StudentInputs(generation=gen))
        _, tok = student.load_student(st.model_dir)
        train_steps, test_steps = steps.STEPS.run(ws, cfg, steps.StepsInputs(
            generation=gen, student=st)), steps.STEPS.run(ws, cfg, steps.StepsInputs(generation=tgen, student=st))
        _, train_items = token_weights.load_encoded(ws, cfg, tok, gen, train_steps)
        test_rows, test_items = token_weights.load_encoded(ws, cfg, tok, tgen, test_steps)
        predictor = warm_up_student(ws, cfg, gen, st, cfg.token_weights.predictor_warmup_epochs)
        tw = token_weights.TOKEN_WEIGHTS.run(ws, cfg, token_weights.TokenWeightsInputs(
            generation=gen, steps=train_steps, predictor=predictor))   # trained once, by the stage
        history = tw.history
        weighter = token_weights.load_weighter(ws, cfg, tw, predictor)
        weights = token_weights.infer_weights(weighter, test_items, tok.pad_token_id)

        meta = {r["example_id"]: json.loads(r["meta_json"]) for r in cat.query("examples_of_dataset", dataset_fp=test_ds.fp)}
        by_rid = {r["rationale_id"]: r for r in test_rows}
        labels, learned, digits = [], [], []
        for it, w in zip(test_items, weights):
            labels += key_marks(tok, it, meta[by_rid[it.rationale_id]["example_id"]]["key_spans"])
            learned += w
            digits += [float(any(c.isdigit() for c in tok.decode([i]))) for i in it.ids[it.rationale_start:it.rationale_end]]
        by_role = defaultdict(list)
        for it, w in zip(test_items, weights):
            for role, x in zip(token_roles(tok, it, meta[by_rid[it.rationale_id]["example_id"]]["key_spans"]), w):
                by_role[role].append(x)
        auc = roc_auc_score(labels, learned)
        auc_digits = roc_auc_score(labels, digits)

        # step difficulty on the training rationales, through the stages themselves
        scorer = warm_up_student(ws, cfg, gen, st, cfg.difficulty.warmup_epochs)
        dif = difficulty.DIFFICULTY.run(ws, cfg, difficulty.DifficultyInputs(
            generation=gen, steps=train_steps, token_weights=tw, scorer=scorer))
        train_meta = {r["example_id"]: json.loads(r["meta_json"]) for r in cat.query("examples_of_dataset", dataset_fp=train_ds.fp)}
        rid_to_ex = {r["rationale_id"]: r["example_id"] for r in cat.query("kept_rationales", dataset_fp=train_ds.fp,
                                                                           teacher_fp=gen.teacher_fp, only_correct=True)}
        d_vals, c_vals = [], []
        for r in cat.query("difficulty_of", difficulty_fp=dif.fp):
            comp = train_meta[rid_to_ex[r["rationale_id"]]]["step_complexity"]
            if r["step_index"] < len(comp):
                d_vals.append(r["difficulty"])
                c_vals.append(comp[r["step_index"]])
        rho = spearmanr(d_vals, c_vals).statistic
        references = difficulty_references(ws, cfg, gen, train_steps, st, train_meta, rid_to_ex)
    print(json.dumps({"bench": "token_weights", "metric": "ROC-AUC of learned token weights vs ground-truth key tokens (held-out)",
                      "value": round(auc, 4), "baseline": 0.5, "ratio": round(auc / 0.5, 3), "goal": "AUC >= 0.85; Spearman >= 0.3",
                      "met": bool(auc >= 0.85 and rho >= 0.3),
                      "details": {"auc_uniform": 0.5, "auc_digits_only": round(auc_digits, 4),
                                  "spearman_difficulty_vs_complexity": round(float(rho), 4), "n_steps_scored": len(d_vals),
                                  "spearman_references": references,
                                  "weight_by_role": {k: round(statistics.fmean(v), 3) for k, v in sorted(by_role.items())},
                                  "n_train": len(train_items), "overrides": overrides, "n_heldout": len(test_items), "key_token_rate": sum(labels) / len(labels),
                                  "mask_history": history}}))


if __name__ == "__main__":
    main()
