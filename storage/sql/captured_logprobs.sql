-- Where the captured log-probabilities of the given rationales are (teacher.logprobs).
select rationale_id, part, n_tokens, k, ids_known
from generation_logprobs
where rationale_id in (select unnest($ids));
