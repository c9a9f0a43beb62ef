from keystep.config import FileDatasetSpec, ReferenceTeacherConfig, SyntheticDatasetSpec
from tasks.formats import training_target
from tests.tasks.helpers import generate_with, ingest_spec
from tasks.teacher_backends import GenerationResult, ReferenceTeacher


class CountingTeacher(ReferenceTeacher):
    def __init__(self, cfg, fail_every=0):
        super().__init__(cfg)
        self.requests = 0
        self.fail_every = fail_every

    def generate(self, requests):
        self.requests += len(requests)
        for i, (req, res) in enumerate(super().generate(requests)):
            yield req, (GenerationResult(text="", status="ok") if self.fail_every and i % self.fail_every == 0 else res)


def test_reference_rationales_stored_with_correctness(catalog):
    spec = SyntheticDatasetSpec(n=20, seed=0)
    dfp = ingest_spec(catalog, spec)
    cfg = ReferenceTeacherConfig()
    s = generate_with(catalog, cfg, dfp)
    assert s.n == 20 and s.n_correct == 20 and s.correct_rate == 1.0
    row = catalog.execute("select * from rationales limit 1")[0]
    assert row["text"].endswith(f"Therefore, the answer is {row['extracted_answer']}.")
    assert row["prompt"].startswith("Q: ") and row["prompt"].endswith("Let's think step by step.")


def test_missing_reference_is_a_failed_row_not_a_crash(catalog, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a?", "answer": "1", "r": "1 is it."}\n{"question": "b?", "answer": "2"}\n')
    spec = FileDatasetSpec(name="d", source="file", path=str(path), rationale_field="r")
    dfp = ingest_spec(catalog, spec)
    cfg = ReferenceTeacherConfig()
    s = generate_with(catalog, cfg, dfp)
    assert s.n_ok == 1 and s.n_failed == 1 and s.failure_reasons == {"no reference rationale in dataset": 1}


def test_empty_output_kept_as_failed_with_reason(catalog):
    spec = SyntheticDatasetSpec(n=6, seed=0)
    dfp = ingest_spec(catalog, spec)
    cfg = ReferenceTeacherConfig()
    s = generate_with(catalog, cfg, dfp, backend=CountingTeacher(cfg, fail_every=2))
    assert s.n_failed == 3 and s.failure_reasons == {"empty response": 3}


def test_new_dataset_version_asks_only_for_new_items(catalog):
    cfg = ReferenceTeacherConfig()
    small, big = SyntheticDatasetSpec(n=20, seed=0), SyntheticDatasetSpec(n=22, seed=0)  # same generator: big = small + 2 new
    for spec, expected in ((small, 20), (big, 2)):
        dfp = ingest_spec(catalog, spec)
        backend = CountingTeacher(cfg)
        generate_with(catalog, cfg, dfp, backend=backend)
        assert backend.requests == expected


def test_training_target_appends_answer_once():
    cfg = ReferenceTeacherConfig()
    assert training_target("3 + 4 = 7.", "7", cfg) == "3 + 4 = 7. Therefore, the answer is 7."
    assert training_target("x. Therefore, the answer is 7.", "7", cfg) == "x. Therefore, the answer is 7."


def test_gsm8k_reference_rationales_are_all_correct(catalog):
    """Real data: GSM8K's own rationales, marks stripped, answer sentence appended, extracted answer = gold."""
    import pytest

    from tests.conftest import SHARED_DATA
    if not SHARED_DATA.exists():
        pytest.skip("shared data not present")
    spec = FileDatasetSpec(name="gsm8k", source="gsm8k", path=str(SHARED_DATA / "gsm8k/train.jsonl"), limit=200)
    dfp = ingest_spec(catalog, spec)
    cfg = ReferenceTeacherConfig()
    s = generate_with(catalog, cfg, dfp)
    assert s.n == 200 and s.correct_rate == 1.0
    assert not catalog.execute("select 1 from rationales where text like '%<<%' or text like '%####%'")
