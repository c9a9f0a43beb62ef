from storage.workspace import Workspace
from tasks.evaluate import accuracy_rows, eval_fingerprint, evaluate_student, results_table
from tasks.ingest import dataset_fingerprint, ingest
from tests.tasks.helpers import prepared


def test_accuracy_per_step_count():
    preds = [{"model_label": "student", "dataset": "s", "split": "test", "meta": {"n_steps": n}, "correct": c}
             for n, c in [(1, True), (1, False), (2, True), (2, True)]]
    rows = {(r["group_key"], r["group_value"]): r["accuracy"] for r in accuracy_rows(preds)}
    assert rows == {("all", "all"): 0.75, ("n_steps", "1"): 0.5, ("n_steps", "2"): 1.0}
    assert "75.0%" in results_table([{**r, "model_label": "student"} for r in accuracy_rows(preds)])


def test_evaluate_stores_results_and_predictions(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16)
    spec = cfg.data.eval[0]
    dfp = dataset_fingerprint(spec)
    ds = {**ingest(cat, spec, dfp), "name": spec.name}
    fp = eval_fingerprint(cfg.eval, "train-x", [dfp], cfg.teacher)
    s = evaluate_student(cat, cfg.eval, cfg.teacher, {"untrained": st["model_dir"]}, [ds], fp, "cpu")
    n = ds["n_examples"]
    assert s["n_predictions"] == n
    preds = cat.execute("select * from predictions where eval_fp = ?", [fp])
    assert len(preds) == n and all(p["prompt"].startswith("Q: ") for p in preds)
    overall = [r for r in cat.query("latest_results", eval_fp=fp) if r["group_key"] == "all"]
    assert overall[0]["n"] == n and overall[0]["n_correct"] == sum(p["correct"] for p in preds)
