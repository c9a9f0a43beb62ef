-- The training stage output behind the most recent evaluation (or $eval_fp's): what `keystep results` says was
-- evaluated.
with latest as (
    select fingerprint, upstream_json
    from stage_outputs
    where stage = 'evaluate'
      and ($eval_fp is null or fingerprint = $eval_fp)
    order by created_at desc
    limit 1
)
select t.fingerprint, t.summary_json
from stage_outputs t
join latest on t.fingerprint = json_extract_string(latest.upstream_json, '$[0]');
