-- The latest runs of the workspace, newest first.
select run_id, status, started_at, finished_at, host, pid
from runs
order by started_at desc
limit $limit;
