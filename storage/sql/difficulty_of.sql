select rationale_id, step_index, difficulty, n_tokens
from step_difficulty
where difficulty_fp = $difficulty_fp
order by rationale_id, step_index;
