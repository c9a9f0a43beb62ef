-- Runs still marked running, with how long ago they last said they were alive.
select run_id, flow_run_id, pid, host, started_at, heartbeat_at,
       epoch(current_timestamp - coalesce(heartbeat_at, started_at)) as silent_s
from runs
where status = 'running';
