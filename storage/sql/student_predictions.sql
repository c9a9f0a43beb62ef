-- Per question: was the trained student right, and what did it answer? (one evaluation; paired comparisons between
-- arms join on example_id)
select dataset, example_id, correct, extracted
from predictions
where eval_fp = $eval_fp
  and model_label = 'student';
