-- The latest completed run started from the same preset (or deployment) before this one: its summary.
select run_id, finished_at, summary_json
from runs
where status = 'completed'
  and run_id <> $run_id
  and json_extract_string(summary_json, '$.label') = $label
order by finished_at desc
limit 1;
