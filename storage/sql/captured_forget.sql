-- Drop the index rows of rationales about to be stored again (a retried item's new attempt).
delete from generation_logprobs
where rationale_id in (select unnest($ids));
