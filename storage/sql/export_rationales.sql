-- Every rationale of one teacher over one dataset, with its question and gold answer: the rows of an export.
-- $only_kept: just the rationales the student trains on (status ok and, with $only_correct, the gold answer).
select e.example_id, e.row_index, e.question, e.answer, e.answer_type, e.choices_json, e.split,
       r.rationale_id, r.sample_index, r.prompt, r.text, r.extracted_answer, r.correct, r.status, r.reason,
       r.finish_reason, r.params_json, r.usage_json, r.latency_s
from rationales r
join examples e on e.example_id = r.example_id and e.dataset_fp = $dataset_fp
where r.teacher_fp = $teacher_fp
  and (not $only_kept or (r.status = 'ok' and (not $only_correct or r.correct)))
order by e.row_index, r.sample_index;
