-- A run whose process is gone: it ended when it last said it was alive.
update runs
set status = 'killed', finished_at = coalesce(heartbeat_at, started_at),
    summary_json = $reason
where run_id = $run_id
  and status = 'running';
