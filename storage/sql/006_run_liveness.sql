-- schema version 6: a run says who runs it (pid, host) and that it is alive (heartbeat_at), so a run killed without
-- warning (SIGKILL, a lost machine) is told apart from a live one and marked 'killed' by the next run or reader.
alter table runs add column pid integer;
alter table runs add column host varchar;
alter table runs add column heartbeat_at timestamp;
