-- schema version 2: the dataset registry scanned by the rerun-new-datasets flow.
create table registry_scans (
    entry         varchar not null,     -- a file path or a hub id
    content_hash  varchar not null,
    status        varchar not null,     -- completed | failed
    distill_run_id varchar,
    error         varchar,
    scanned_at    timestamp default current_timestamp
);
