-- Per question: was the trained student right? (one evaluation; paired comparisons between arms join on example_id)
select dataset, example_id, correct
from predictions
where eval_fp = $eval_fp
  and model_label = 'student';
