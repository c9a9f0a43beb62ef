"""tasks/stage.py: Prefect's copy of a stage output is keyed by the lineage and by the output's model, so a pickle
from before the model gained a field is never returned (the catalog's JSON copy takes the field's default)."""
from pydantic import create_model

from storage.fingerprint import Lineage
from tasks.stage import StageOutput, lineage_key


def test_the_prefect_cache_key_is_the_lineage_and_changes_when_the_output_gains_a_field():
    before = create_model("TeacherScores", __base__=StageOutput, n_sequences=(int, ...))
    after = create_model("TeacherScores", __base__=StageOutput, n_sequences=(int, ...), n_reused=(int, 0))
    lineage = Lineage("teacher-scores", {"k": 20}, ("generate-0",), "1")

    def key(output, lin=lineage):
        return lineage_key(output).compute_key(None, {"lineage": lin}, {})

    assert key(before) == key(before) and key(before).startswith(lineage.fp)
    assert key(after) != key(before)                          # a new field: Prefect's old pickle is not returned
    assert key(before, Lineage("teacher-scores", {"k": 5}, ("generate-0",), "1")) != key(before)
