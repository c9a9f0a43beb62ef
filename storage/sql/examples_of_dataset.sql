select example_id, question, answer, answer_value, answer_type, choices_json, reference_rationale, split, meta_json
from examples
where dataset_fp = $dataset_fp
order by row_index;
