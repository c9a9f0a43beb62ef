select rationale_id, step_index, text, char_start, char_end, token_start, token_end
from steps
where steps_fp = $steps_fp
order by rationale_id, step_index;
