-- The latest completed run started from the same preset (or deployment) with the same loss before this one: its
-- summary (runs recorded before the loss was kept in summaries count as no match).
select run_id, finished_at, summary_json
from runs
where status = 'completed'
  and run_id <> $run_id
  and json_extract_string(summary_json, '$.label') = $label
  and json_extract_string(summary_json, '$.loss') = $loss
order by finished_at desc
limit 1;
