from storage.workspace import Workspace
from tasks.evaluate import accuracy_rows, EVALUATE, EvaluateInputs, results_table
from tasks.ingest import ingest
from tasks.train import Trained
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
    ds = ingest(ws, cfg.data.eval[0])
    untrained = Trained(fp="train-x", final_dir=st.model_dir, init_dir=st.model_dir, epochs=0, target_format="cot_then_label",
                        loss="std_cot", n_examples=0, n_truncated=0, n_unweighted=None, resumed_from_epoch=0,
                        device="cpu", history=[])
    only_student = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"include_untrained": False})})
    s = EVALUATE.run(ws, only_student, EvaluateInputs(trained=untrained, student=st, datasets=[ds]))
    fp = s.fp
    n = ds.n_examples
    assert s.n_predictions == n
    preds = cat.execute("select * from predictions where eval_fp = ?", [fp])
    assert len(preds) == n and all(p["prompt"].startswith("Q: ") for p in preds)
    overall = [r for r in cat.query("latest_results", eval_fp=fp) if r["group_key"] == "all"]
    assert overall[0]["n"] == n and overall[0]["n_correct"] == sum(p["correct"] for p in preds)


def test_report_warns_when_more_than_5_percent_were_cut():
    from tasks.evaluate import summary_markdown
    from tasks.ingest import Dataset
    from tasks.teacher import Generation

    gen = Generation(fp="g", dataset_fp="d", teacher_fp="t", n=100, n_ok=100, n_failed=0, n_correct=100, correct_rate=1.0,
                     failure_reasons={}, prompt_tokens=0, completion_tokens=0, mean_latency_s=0.0)
    trained = Trained(fp="t", final_dir="x", init_dir="x", epochs=1, target_format="cot_then_label", loss="std_cot",
                      n_examples=100, n_truncated=6, n_unweighted=None, resumed_from_epoch=0, device="cpu",
                      history=[{"loss": 1.0, "stage": None}])
    ds = Dataset(fp="d", name="s", split="train", n_examples=100, n_bad=0, bad_reasons={})
    assert "**Warning:** 6 of 100 training sequences (6%) were cut" in summary_markdown("x", [], gen, [ds], trained)
    ok = trained.model_copy(update={"n_truncated": 5})
    assert "Warning" not in summary_markdown("x", [], gen, [ds], ok)


def test_the_run_page_tells_the_teacher_cost_and_says_when_it_was_cached():
    from tasks.evaluate import teacher_usage
    from tasks.teacher import Generation

    paid = Generation(fp="g", dataset_fp="d", teacher_fp="t", n=200, n_ok=198, n_failed=2, n_correct=180,
                      correct_rate=0.9, failure_reasons={}, prompt_tokens=12000, completion_tokens=34000,
                      mean_latency_s=0.5, completion_tokens_per_s=850.0, cost_estimate=0.0123)
    fresh, cached = teacher_usage(paid, cached=False), teacher_usage(paid, cached=True)
    assert "12,000 prompt + 34,000 completion tokens" in fresh and "$0.0123" in fresh and "850 completion tok/s" in fresh
    assert "cached: 0 new tokens (originally 12,000 prompt + 34,000 completion tokens, est. cost $0.0123)" in cached
    reference = paid.model_copy(update={"prompt_tokens": 0, "completion_tokens": 0, "cost_estimate": None})
    assert "no teacher calls" in teacher_usage(reference, cached=False)


def test_the_headline_compares_with_the_previous_run_of_the_same_preset_and_loss(catalog):
    import json

    for run_id, loss, acc, t in [("a", "kpod", 0.40, "2026-01-01 10:00"), ("b", "std_cot", 0.50, "2026-01-01 11:00"),
                                 ("c", "kpod", 0.45, "2026-01-01 12:00")]:
        catalog.execute("insert into runs (run_id, config_json, status, started_at, finished_at, summary_json) values "
                        "(?, '{}', 'completed', ?, ?, ?)", [run_id, t, t, json.dumps({"label": "micro", "loss": loss,
                                                                                     "accuracy": {"student/s/test": acc}})])
    previous = catalog.query("previous_run", run_id="new", label="micro", loss="std_cot")
    assert [r["run_id"] for r in previous] == ["b"]        # not the later kpod run
    assert [r["run_id"] for r in catalog.query("previous_run", run_id="new", label="micro", loss="kpod")] == ["c"]
    assert not catalog.query("previous_run", run_id="new", label="micro", loss="kd")


def test_the_accuracy_plot_labels_its_bars_even_at_zero(tmp_path):
    from tasks.evaluate import summary_plots

    rows = [{"dataset": "s", "split": "test", "group_key": "all", "group_value": "all", "model_label": m,
             "accuracy": 0.0} for m in ("student", "untrained")]
    trained = Trained(fp="t", final_dir="x", init_dir="x", epochs=1, target_format="cot_then_label", loss="std_cot",
                      n_examples=1, n_truncated=0, n_unweighted=None, resumed_from_epoch=0, device="cpu", history=[])
    import matplotlib.pyplot as plt
    closed = []
    real_close = plt.close
    plt.close = lambda fig=None: closed.append(fig) or real_close(fig)
    try:
        paths = summary_plots(rows, trained, tmp_path)
    finally:
        plt.close = real_close
    fig = closed[0]
    ax = fig.axes[0]
    assert ax.get_title() and [t.get_text() for t in ax.texts] == ["0.0", "0.0"] and fig.get_size_inches()[0] >= 7
    assert (tmp_path / "accuracy.png").is_file() and "accuracy" in paths


def test_the_student_folder_runs_the_same_in_a_plain_hugging_face_client(tmp_path):
    """Not keystep's code path: AutoTokenizer + AutoModelForCausalLM.generate with their defaults (one prompt at a
    time, the tokenizer's own special tokens) on the trained student's folder give exactly keystep's predictions, and
    the folder's context holds a training-length prompt plus the evaluation's generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.train import TrainInputs, TRAIN

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=64, **{"train.epochs": 2, "eval.include_untrained": False,
                                              "eval.curve_questions": 0})
    trained = TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=st))
    evaluation = EVALUATE.run(ws, cfg, EvaluateInputs(
        trained=trained, student=st, datasets=[ingest(ws, cfg.data.eval[0])]))
    preds = cat.execute("select prompt, output from predictions where eval_fp = ? and model_label = 'student'",
                        [evaluation.fp])
    tok = AutoTokenizer.from_pretrained(trained.final_dir)
    model = AutoModelForCausalLM.from_pretrained(trained.final_dir).eval()
    assert model.config.max_position_embeddings >= cfg.student.max_length + cfg.eval.max_new_tokens
    assert tok.model_max_length == model.config.max_position_embeddings
    same = 0
    for p in preds:
        enc = tok(p["prompt"], return_tensors="pt")
        assert enc["input_ids"][0, 0].item() == tok.bos_token_id          # <bos> prompt, as keystep trains on it
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=cfg.eval.max_new_tokens)
        same += tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == p["output"]
    assert len(preds) == 16 and same == len(preds)


def test_a_logit_distillation_runs_summary_names_the_teacher_distributions(tmp_path):
    from keystep.config import load_config
    from tasks.evaluate import teacher_distributions
    from tests.conftest import ROOT

    folder = tmp_path / "teacher-epoch-8"
    cfg = load_config(ROOT / "configs" / "micro.yaml", {"train.loss": "kd", "train.kd.alpha": 0.7,
                                                        "teacher_scores.model": str(folder), "teacher_scores.k": 8})
    assert teacher_distributions(cfg) == ("top-8 of teacher-epoch-8 (local scoring); KL weight α 0.7, "
                                          "temperature τ 1.0")
