import json

import pytest

from keystep.config import ConfigError, SyntheticDatasetSpec, FileDatasetSpec
from storage.workspace import Workspace
from tasks.ingest import IngestInputs, dataset_lineage, generate_arith, ingest, load_examples
from tests.conftest import SHARED_DATA


def test_synthetic_is_deterministic_and_marks_key_tokens():
    a = generate_arith(50, seed=3)
    b = generate_arith(50, seed=3)
    assert [x.question for x in a] == [x.question for x in b]
    assert [x.question for x in a] != [x.question for x in generate_arith(50, seed=4)]
    for ex in a:
        r = ex.reference_rationale
        assert len(ex.meta["step_complexity"]) == ex.meta["n_steps"]
        assert r.count(".") == ex.meta["n_steps"]  # one sentence per step
        keys = [r[s:e] for s, e in ex.meta["key_spans"]]
        assert len(keys) == 5 * ex.meta["n_steps"]  # a op b = c per step
        assert all(k.isdigit() or k in "+-x=" for k in keys)
        assert keys[-1] == ex.answer  # the last result is the answer
        # filler words around the numbers are not key tokens
        assert any(w.isalpha() for w in r.split())


def test_synthetic_steps_range():
    exs = generate_arith(200, seed=0, min_steps=2, max_steps=4)
    assert {e.meta["n_steps"] for e in exs} == {2, 3, 4}


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data not present")
def test_gsm8k_loader_strips_calculator_marks():
    spec = FileDatasetSpec(name="gsm8k", source="gsm8k", path=str(SHARED_DATA / "gsm8k/test.jsonl"), limit=50)
    exs, bad = load_examples(spec)
    assert len(exs) == 50 and not bad
    assert exs[0].answer == "18"  # Janet's ducks
    assert all("<<" not in e.reference_rationale and "####" not in e.reference_rationale for e in exs)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data not present")
def test_svamp_loader_joins_body_and_question():
    spec = FileDatasetSpec(name="svamp", source="svamp", path=str(SHARED_DATA / "svamp/SVAMP.json"))
    exs, bad = load_examples(spec)
    assert len(exs) + len(bad) == 1000
    assert exs[0].question.startswith("Each pack of dvds costs 76 dollars") and exs[0].question.endswith("each pack?")
    assert exs[0].answer == "51" and exs[0].reference_rationale is None
    assert all(b["reason"] == "duplicate" for b in bad)


def test_generic_loader_counts_every_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"q": "What is 2+2?", "a": "4 (apples)"}, {"q": "", "a": "1"}, {"q": "No answer?"},
            {"q": "Bad?", "a": "many"}, {"q": "What is 2+2?", "a": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    spec = FileDatasetSpec(name="d", source="file", path=str(path), question_field="q", answer_field="a")
    exs, bad = load_examples(spec)
    assert [e.answer for e in exs] == ["4"]
    reasons = sorted(b["reason"].split(" (")[0] for b in bad)
    assert reasons == ["duplicate", "empty question", "invalid JSON: Expecting property name enclosed in double quotes",
                       "missing answer", "unparseable answer"]
    assert {b["row_index"] for b in bad} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_generic_formats(tmp_path, fmt):
    rows = [{"question": f"q{i}?", "answer": str(i), "why": f"because {i}"} for i in range(5)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        path.write_text("question,answer,why\n" + "\n".join(f"{r['question']},{r['answer']},{r['why']}" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    exs, bad = load_examples(FileDatasetSpec(name="d", source="file", path=str(path), rationale_field="why"))
    assert [e.answer for e in exs] == ["0", "1", "2", "3", "4"] and not bad
    assert exs[2].reference_rationale == "because 2"


def test_hub_loader_on_a_local_dataset_folder(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"question": "q1?", "answer": "3"}, {"question": "q2?", "answer": "x"}])
    ds.save_to_disk(str(tmp_path / "hubds"))
    exs, bad = load_examples(FileDatasetSpec(name="h", source="hub", path=str(tmp_path / "hubds")))
    assert [e.answer for e in exs] == ["3"] and len(bad) == 1


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_examples(FileDatasetSpec(name="d", source="file", path=str(tmp_path / "x.jsonl")))


def test_ingest_stores_examples_and_bad_rows(catalog, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a?", "answer": "1"}\n{"question": "b?", "answer": ""}\n')
    spec = FileDatasetSpec(name="d", source="file", path=str(path))
    summary = ingest(Workspace(catalog.path.parent), spec)
    fp = summary.fp
    assert summary.n_examples == 1 and summary.bad_reasons == {"missing answer": 1}
    assert catalog.execute("select count(*) as n from bad_rows where dataset_fp = ?", [fp])[0]["n"] == 1
    # an edited file is a new dataset version
    path.write_text('{"question": "a?", "answer": "2"}\n')
    assert dataset_lineage(None, IngestInputs(spec=spec)).fp != fp


def test_eval_overlap_with_train_is_reported_not_silent(catalog):
    train = SyntheticDatasetSpec(n=30, seed=0, max_steps=1, max_operand=3)
    ws = Workspace(catalog.path.parent)
    train_ds = ingest(ws, train)
    ev = SyntheticDatasetSpec(n=30, seed=0, max_steps=1, max_operand=3, split="test")  # same problems
    s = ingest(ws, ev, exclude=train_ds)
    assert s.n_examples == 0 and s.bad_reasons == {"overlaps training set": 30}


def test_question_template_over_columns(tmp_path):
    """ASDiv/SVAMP-style rows: the question is Body + Question; a row without a column is a counted bad row."""
    path = tmp_path / "asdiv.csv"
    path.write_text("Body,Question,Answer\nTom has 3 apples.,How many now?,3\nMia has 2 pens.,,2\n")
    spec = FileDatasetSpec(name="asdiv", source="file", path=str(path), question_template="{Body} {Question}",
                       answer_field="Answer")
    examples, bad = load_examples(spec)
    assert [e.question for e in examples] == ["Tom has 3 apples. How many now?", "Mia has 2 pens."]
    no_question = tmp_path / "asdiv.jsonl"
    no_question.write_text('{"Body": "Tom has 3 apples.", "Answer": 3}\n')
    examples, bad = load_examples(spec.model_copy(update={"path": str(no_question)}))
    assert not examples and bad[0]["reason"] == "missing column 'Question' (question_template)"


def test_a_bad_question_template_fails_before_reading_any_file():
    with pytest.raises(ValueError, match="question_template"):
        FileDatasetSpec(name="x", source="file", path="x.csv", question_template="{Body")


@pytest.mark.parametrize("layout", ["jsonl", "hub"])
def test_multiple_choice_questions_show_their_choices_and_answers_are_labels(tmp_path, layout):
    """CommonsenseQA in its two layouts: the jsonl (question.stem, question.choices [{label, text}]) and the
    hub's (question, choices {label: [...], text: [...]}, answerKey)."""
    import json

    rows = [("Where do you put a coat?", ["closet", "oven", "river"], "A"), ("What is cold?", ["fire", "ice", "sun"], "B"),
            ("Bad row?", ["a", "b"], "E")]
    if layout == "jsonl":
        lines = [{"answerKey": a, "question": {"stem": q, "choices": [{"label": chr(65 + i), "text": t} for i, t in enumerate(c)]}}
                 for q, c, a in rows]
        spec_kw = {"question_field": "question.stem", "choices_field": "question.choices"}
    else:
        lines = [{"answerKey": a, "question": q, "choices": {"label": [chr(65 + i) for i in range(len(c))], "text": c}}
                 for q, c, a in rows]
        spec_kw = {"question_field": "question", "choices_field": "choices"}
    path = tmp_path / "csqa.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    spec = FileDatasetSpec(name="csqa", source="file", path=str(path), answer_field="answerKey", answer_type="choice", **spec_kw)
    examples, bad = load_examples(spec)
    assert examples[0].question == "Where do you put a coat?\nAnswer Choices: (A) closet (B) oven (C) river"
    assert [e.answer for e in examples] == ["A", "B"] and examples[1].choices[1] == ["B", "ice"]
    assert [b["reason"] for b in bad] == ["answer 'E' is not a choice label"]   # counted, not silently kept
    from keystep.config import ReferenceTeacherConfig
    from tasks.answers import extract_answer, is_correct
    from tasks.formats import format_prompt
    assert "(B) ice" in format_prompt(ReferenceTeacherConfig(), examples[1].question)       # the teacher and student see them
    said = "Ice is frozen water, so it is cold. Therefore, the answer is (B)."
    assert is_correct(extract_answer(said, "choice"), examples[1].answer, "choice")


def test_choices_need_the_choice_answer_type():
    with pytest.raises(ValueError, match="answer_type: choice"):
        FileDatasetSpec(name="x", source="file", path="x.jsonl", choices_field="choices")
