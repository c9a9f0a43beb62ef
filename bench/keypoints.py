"""Keypoint quality on synthetic:arith (KPOD §4.1-4.2).

1. ROC-AUC of the learned token weights on *held-out* rationales against the generator's ground-truth key-token
   marks (operands, operators, results); beside it a uniform scorer (0.5) and a digits-only heuristic.
   Goal >= 0.85.
2. Spearman correlation between step difficulty (§4.2, on the training rationales) and the generator's step
   complexity. Goal >= 0.3. Beside it, the same scoring model with other weightings (`spearman_references`):
   eq. 7 with the ground-truth key marks as 0/1 weights, the plain mean NLL, the result token's NLL alone.
Usage: python bench/keypoints.py [N_TRAIN] [section.key=value ...]
"""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import load_config  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks import difficulty, ingest, keypoints, steps, student, teacher  # noqa: E402


def prepared(ws, cfg, spec):
    cat = ws.catalog()
    dfp = ingest.dataset_fingerprint(spec)
    ingest.ingest(cat, spec, dfp)
    gfp = teacher.generation_fingerprint(cfg.teacher, dfp)
    gen = {**teacher.generate_rationales(cat, cfg.teacher, dfp, gfp), "fingerprint": gfp}
    return dfp, gen


def key_marks(tok, it, spans) -> list[int]:
    """Per rationale token of `it`: 1 when it overlaps a ground-truth key span of the generator."""
    marks = []
    for j in range(it.rationale_start, it.rationale_end):
        a, b = it.char_spans[j]
        text = tok.decode([it.ids[j]])
        a += len(text) - len(text.lstrip())  # ignore the leading space a byte-level token carries
        marks.append(int(any(a < e and b > s for s, e in spans)))
    return marks


def difficulty_references(cat, cfg, gen, steps_fp, st, train_meta, rid_to_ex) -> dict:
    """Spearman(step score, step complexity) for the same scoring model with other token weightings — to tell
    how much of the gap to the goal is the learned weights and how much the scoring model: eq. 7 with the
    generator's ground-truth key marks as 0/1 weights (what perfect masks would give), the plain mean NLL, and
    the NLL of the step's result token alone."""
    from scipy.stats import spearmanr

    from tasks.train import pick_device, warm_up_student

    device = pick_device("auto")  # as the difficulty stage scores, so the references compare like with like
    model, tok = student.load_student(warm_up_student(cat, cfg.teacher, gen, st, cfg.difficulty.warmup_epochs,
                                                      cfg.student.max_length), device=device)
    _, items = keypoints.load_encoded(cat, tok, cfg.teacher, gen, steps_fp, cfg.student.max_length)
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

    n_train = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    overrides = {k: parse_value(v) for k, _, v in (a.partition("=") for a in sys.argv[2:])}
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"data.train.n": n_train, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        cat = ws.catalog()
        dfp, gen = prepared(ws, cfg, cfg.data.train)
        test_spec = cfg.data.eval[0]
        tdfp, tgen = prepared(ws, cfg, test_spec)
        corpus = [r["question"] + " " + r["text"] for r in cat.query("kept_rationales", dataset_fp=dfp, teacher_fp=gen["teacher_fp"], only_correct=True)]
        sfp = student.student_fingerprint(cfg.student, gen["fingerprint"])
        st = student.init_student(cat, cfg.student, corpus, ws.model_dir(sfp), sfp)
        model, tok = student.load_student(st["model_dir"])

        def encoded(g):
            fp = steps.steps_fingerprint(cfg.steps, g["fingerprint"], sfp)
            steps.split_rationales(cat, cfg.steps, cfg.teacher, g, st["model_dir"], fp)
            step_rows = {}
            for s in cat.query("steps_of_rationales", steps_fp=fp):
                step_rows.setdefault(s["rationale_id"], []).append(s)
            rows = cat.query("kept_rationales", dataset_fp=g["dataset_fp"], teacher_fp=g["teacher_fp"], only_correct=True)
            return fp, rows, keypoints.encode_rationales(tok, cfg.teacher, rows, step_rows, cfg.student.max_length)

        train_steps_fp, _, train_items = encoded(gen)
        _, test_rows, test_items = encoded(tgen)
        base = keypoints.weighter_base(cat, cfg.masks, cfg.teacher, gen, st, cfg.student.max_length)
        model, _ = student.load_student(base)
        weighter, history = keypoints.train_masks(cfg.masks, model.get_input_embeddings(), tok, train_items,
                                                  predictor_dir=base, answer_template=cfg.teacher.answer_template)
        weights = keypoints.infer_weights(weighter, test_items, tok.pad_token_id)

        meta = {r["example_id"]: json.loads(r["meta_json"]) for r in cat.query("examples_of_dataset", dataset_fp=tdfp)}
        by_rid = {r["rationale_id"]: r for r in test_rows}
        labels, learned, digits = [], [], []
        for it, w in zip(test_items, weights):
            labels += key_marks(tok, it, meta[by_rid[it.rationale_id]["example_id"]]["key_spans"])
            learned += w
            digits += [float(any(c.isdigit() for c in tok.decode([i]))) for i in it.ids[it.rationale_start:it.rationale_end]]
        auc = roc_auc_score(labels, learned)
        auc_digits = roc_auc_score(labels, digits)

        # step difficulty on the training rationales, through the stage itself
        wfp = keypoints.weights_fingerprint(cfg.masks, train_steps_fp, sfp)
        keypoints.learn_token_weights(cat, cfg.masks, cfg.teacher, gen, train_steps_fp, st, cfg.student.max_length, wfp)
        dfp2 = difficulty.difficulty_fingerprint(cfg.difficulty, wfp, sfp)
        difficulty.score_difficulty(cat, cfg.difficulty, cfg.teacher, gen, train_steps_fp, wfp, st, True,
                                    cfg.student.max_length, dfp2)
        train_meta = {r["example_id"]: json.loads(r["meta_json"]) for r in cat.query("examples_of_dataset", dataset_fp=dfp)}
        rid_to_ex = {r["rationale_id"]: r["example_id"] for r in cat.query("kept_rationales", dataset_fp=dfp, teacher_fp=gen["teacher_fp"], only_correct=True)}
        d_vals, c_vals = [], []
        for r in cat.query("difficulty_of", difficulty_fp=dfp2):
            comp = train_meta[rid_to_ex[r["rationale_id"]]]["step_complexity"]
            if r["step_index"] < len(comp):
                d_vals.append(r["difficulty"])
                c_vals.append(comp[r["step_index"]])
        rho = spearmanr(d_vals, c_vals).statistic
        references = difficulty_references(cat, cfg, gen, train_steps_fp, st, train_meta, rid_to_ex)
    print(json.dumps({"bench": "keypoints", "metric": "ROC-AUC of learned token weights vs ground-truth key tokens (held-out)",
                      "value": round(auc, 4), "baseline": 0.5, "ratio": round(auc / 0.5, 3), "goal": "AUC >= 0.85; Spearman >= 0.3",
                      "met": bool(auc >= 0.85 and rho >= 0.3),
                      "details": {"auc_uniform": 0.5, "auc_digits_only": round(auc_digits, 4),
                                  "spearman_difficulty_vs_complexity": round(float(rho), 4), "n_steps_scored": len(d_vals),
                                  "spearman_references": references,
                                  "n_train": len(train_items), "overrides": overrides, "n_heldout": len(test_items), "key_token_rate": sum(labels) / len(labels),
                                  "mask_history": history}}))


if __name__ == "__main__":
    main()
