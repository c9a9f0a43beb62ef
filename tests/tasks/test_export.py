"""The distilled dataset as files: loadable by `datasets`, one row per rationale with what the prepare phase
computed, SFT layouts that are exactly keystep's training text, a dataset card, and a cached, atomic stage."""
import json
import subprocess
import sys


from storage.workspace import Workspace
from tasks.export import EXPORT, ExportInputs, training_text
from tasks.formats import NO_CUT, encode_rationale, format_target
from tests.conftest import ROOT
from tests.tasks.helpers import kpod_prepared, prepared

FORMATS = ["cot_then_label", "label_then_cot", "label_only", "label_then_shuffled_cot", "label_then_keytokens"]


def test_export_loads_back_and_its_sft_rows_are_the_training_text(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    ws = Workspace(tmp_path / "ws")
    cfg, cat, gen, st, kpod = kpod_prepared(ws, n=16, **{"export.formats": FORMATS, "export.license": "cc-by-4.0"})
    from tasks.difficulty import DIFFICULTY, DifficultyInputs
    dif = DIFFICULTY.run(ws, cfg, DifficultyInputs(
        generation=gen, steps=kpod["steps"], token_weights=kpod["token_weights"], scorer=st))   # the helper's stage
    out = EXPORT.run(ws, cfg, ExportInputs(
        generation=gen, student=st, steps=kpod["steps"], token_weights=kpod["token_weights"], difficulty=dif))
    kept = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)

    rows = datasets.load_from_disk(f"{out.out_dir}/hf/rationales")
    same = datasets.load_dataset("parquet", data_files=f"{out.out_dir}/rationales/train.parquet", split="train")
    assert len(rows) == len(same) == len(kept) == out.n_rows
    assert {"question", "answer", "rationale", "extracted_answer", "correct", "status", "reason", "steps",
            "token_weights", "keypoints", "step_difficulty", "teacher_model", "prompt", "sampling_params",
            "prompt_tokens", "completion_tokens"} <= set(rows.column_names)
    first = rows[0]
    assert first["steps"] and all(first["rationale"][s["char_start"]:s["char_end"]] == s["text"] for s in first["steps"])
    answer_sentence = cfg.teacher.answer_template.format(answer=first["answer"])
    assert first["steps"][-1]["text"] == answer_sentence                # steps end with the answer sentence ...
    assert len(first["step_difficulty"]) == len(first["steps"]) - 1 and first["keypoints"]   # ... which has no difficulty
    assert all(0 <= w <= 1 for w in first["token_weights"])

    tok = AutoTokenizer.from_pretrained(st.model_dir)
    keys = {r["rationale_id"]: r["keypoints"] for r in rows}
    for fmt in FORMATS:
        sft = datasets.load_dataset("parquet", data_files=f"{out.out_dir}/sft/{fmt}/train.parquet", split="train")
        assert len(sft) == len(kept) and datasets.load_from_disk(f"{out.out_dir}/hf/sft-{fmt}").num_rows == len(kept)
        by_id = {r["rationale_id"]: r for r in sft}
        for row in kept:
            s = by_id[row["rationale_id"]]
            # TRL concatenates prompt + completion: exactly the text keystep trains on in this format
            assert tok.decode(tok(s["prompt"] + s["completion"]).input_ids, skip_special_tokens=True) == \
                training_text(tok, cfg, row, fmt, keys[row["rationale_id"]])
            # ... token for token: the student folder's tokenizer adds the <bos> keystep trains with (TRL adds the <eos>)
            target = format_target(fmt, row["text"], row["answer"], cfg.teacher, keys[row["rationale_id"]] or "",
                                   shuffle_seed=row["rationale_id"])
            assert tok(s["prompt"] + s["completion"]).input_ids + [tok.eos_token_id] == \
                encode_rationale(tok, cfg.teacher, row, NO_CUT, target).ids
            assert s["messages"][0]["content"] == s["prompt"] and " " + s["messages"][1]["content"] == s["completion"]
            # the student folder's chat template renders `messages` as that same text, <bos> and <eos> included
            assert tok.apply_chat_template(s["messages"], tokenize=False) == \
                tok.bos_token + s["prompt"] + s["completion"] + tok.eos_token

    card = (tmp_path / out.out_dir / "README.md").read_text()
    meta = card.split("---")[1]
    assert "license: cc-by-4.0" in meta and "config_name: sft-label_then_keytokens" in meta and "n<1K" in meta
    assert gen.fp in card and "counts by status" in card and "| `step_difficulty` |" in card and "<bos>" in card
    # a reference teacher had no sampling or usage: neither the card nor the rows claim any
    assert "no sampling" in card and "temperature" not in card
    assert rows[0]["sampling_params"] is None and rows[0]["prompt_tokens"] is None
    # as the hub loads it: the default config is the rationales, and the card's snippet uses the hub's loader
    assert datasets.load_dataset(out.out_dir, split="train").num_rows == len(kept)
    assert "load_from_disk" not in card and "load_dataset('path/to/this/folder', 'rationales'" in card
    assert out.out_dir not in (tmp_path / out.out_dir / "export.json").read_text()     # it would be pushed


def test_all_rows_keep_failed_ones_with_their_reason_and_the_stage_is_cached(tmp_path):
    ws = Workspace(tmp_path / "ws")
    cfg, cat, gen, st = prepared(ws, n=16, **{"export.rows": "all", "export.out": str(tmp_path / "out")})
    victim = cat.execute("select rationale_id from rationales limit 1")[0]["rationale_id"]
    cat.execute("update rationales set status = 'failed', reason = 'malformed response (KeyError)', correct = false "
                "where rationale_id = ?", [victim])
    kept_only = EXPORT.run(ws, cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"rows": "kept", "out": str(tmp_path / "kept")})}), ExportInputs(generation=gen, student=st))
    out = EXPORT.run(ws, cfg, ExportInputs(generation=gen, student=st))
    rows = {r["rationale_id"]: r for r in __import__("datasets").load_from_disk(f"{out.out_dir}/hf/rationales")}
    # one schema whatever the rows: `reason` is a string column even when every kept row's is null
    features = [__import__("datasets").load_from_disk(f"{o.out_dir}/hf/rationales").features for o in (kept_only, out)]
    assert features[0] == features[1] and features[0]["reason"].dtype == "string"
    card = (tmp_path / "kept" / "README.md").read_text()
    assert "license: other" in card and "license_name: source-and-teacher-terms" in card and "license_link: LICENSE.md" in card
    assert "synthetic:arith" in (tmp_path / "kept" / "LICENSE.md").read_text()
    assert len(rows) == 16 and rows[victim]["status"] == "failed" and rows[victim]["reason"].startswith("malformed")
    assert out.n_sft == 2 * 15                                          # SFT layouts hold what training reads
    stamp = (tmp_path / "out" / "export.json").stat().st_mtime_ns
    again = EXPORT.run(ws, cfg, ExportInputs(generation=gen, student=st))
    assert again == out and (tmp_path / "out" / "export.json").stat().st_mtime_ns == stamp   # cached
    assert not list(tmp_path.glob(".tmp-*"))                            # published by rename


def test_cli_export_and_a_push_without_a_token_is_one_line_before_any_work(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_TOKEN"}

    def keystep(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", "export", "configs/micro.yaml", "--workspace",
                               str(tmp_path / "ws"), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=env)

    r = keystep("--out", str(tmp_path / "pushed"), "--push-to-hub", "me/rationales")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "HF_TOKEN" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pushed").exists() and not (tmp_path / "ws" / "catalog.duckdb").exists()
    r = keystep("--out", str(tmp_path / "out"), "--set", "export.formats=[label_only]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exported 64 rationales and 64 SFT rows (label_only)" in r.stdout
    assert json.loads((tmp_path / "out" / "export.json").read_text())["formats"] == ["label_only"]
    (tmp_path / "a-file").write_text("x")
    r = keystep("--out", str(tmp_path / "a-file"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "export.out" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "a-file").read_text() == "x"


def test_teacher_scores_are_a_column_of_the_rationales_aligned_with_the_training_tokens(tmp_path):
    """With the teacher-scores stage run, the export carries each kept rationale's training token ids and, per
    position, the teacher's top-k next tokens and log-probabilities; rows the stage did not score have none."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs, top_k_scores
    from tasks.student import load_student

    ws = Workspace(tmp_path / "ws")
    cfg, cat, gen, st = prepared(ws, n=16, **{"export.rows": "all"})
    cfg = cfg.model_copy(update={"teacher_scores": cfg.teacher_scores.model_copy(update={"model": st.model_dir, "k": 5})})
    scores = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))
    out = EXPORT.run(ws, cfg, ExportInputs(generation=gen, student=st, teacher_scores=scores))
    assert out.with_teacher_scores
    rows = datasets.load_dataset("parquet", data_files=f"{out.out_dir}/rationales/train.parquet", split="train")
    tok = AutoTokenizer.from_pretrained(st.model_dir)
    kept = {r["rationale_id"]: r for r in cat.query("kept_rationales", dataset_fp=gen.dataset_fp,
                                                    teacher_fp=gen.teacher_fp, only_correct=True)}
    model, _ = load_student(st.model_dir, device="cpu")
    with_scores = [r for r in rows if r["teacher_topk_ids"] is not None]
    assert {r["rationale_id"] for r in with_scores} == set(kept)          # the kept rows, and only they
    for r in with_scores[:4]:
        ids = encode_rationale(tok, cfg.teacher, kept[r["rationale_id"]], NO_CUT).ids
        assert r["token_ids"] == ids
        top_ids, top_lp = top_k_scores(model, [ids], 5, 4096, "cpu")[0]
        assert np.array_equal(np.array(r["teacher_topk_ids"]), top_ids)
        assert np.allclose(np.array(r["teacher_topk_logprobs"]), top_lp, atol=2e-2)   # stored as float16
    card = (tmp_path / out.out_dir / "README.md").read_text()
    assert "| `teacher_topk_logprobs` |" in card
