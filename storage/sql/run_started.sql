-- A distill run begins (run_id: the Prefect flow run id, or a fresh id for a run read from the catalog).
insert or replace into runs (run_id, flow_run_id, config_json, status, pid, host, heartbeat_at)
values ($run_id, $flow_run_id, $config_json, 'running', $pid, $host, current_timestamp);
