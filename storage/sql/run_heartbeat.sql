-- A running run is alive.
update runs
set heartbeat_at = current_timestamp
where run_id = $run_id
  and status = 'running';
