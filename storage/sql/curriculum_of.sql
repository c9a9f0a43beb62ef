select stage, example_id, rationale_id, prefix_steps
from curriculum
where fp = $fp
order by stage, rationale_id;
