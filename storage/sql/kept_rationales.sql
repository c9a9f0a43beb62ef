-- Rationales the student trains on: generated without failure and, unless disabled, with the gold answer.
select r.rationale_id, r.example_id, r.sample_index, r.text, e.question, e.answer, e.answer_type
from rationales r
join examples e on e.example_id = r.example_id and e.dataset_fp = $dataset_fp
where r.teacher_fp = $teacher_fp
  and r.status = 'ok'
  and (not $only_correct or r.correct)
order by e.row_index, r.sample_index;
