-- Accuracy rows of the most recent evaluation recorded in the catalog (or of $eval_fp when given).
with latest as (
    select fingerprint
    from stage_outputs
    where stage = 'evaluate'
      and ($eval_fp is null or fingerprint = $eval_fp)
    order by created_at desc
    limit 1
)
select r.model_label, r.dataset, r.split, r.group_key, r.group_value, r.n, r.n_correct, r.accuracy
from eval_results r
join latest on r.eval_fp = latest.fingerprint
order by r.dataset, r.split, r.group_key, try_cast(r.group_value as integer), r.group_value, r.model_label desc;
