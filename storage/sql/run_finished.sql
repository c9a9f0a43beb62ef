-- A distill run ends: completed (with its summary) or failed.
update runs
set status = $status, finished_at = current_timestamp, summary_json = $summary_json
where run_id = $run_id;
