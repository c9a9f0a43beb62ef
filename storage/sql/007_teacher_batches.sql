-- schema version 7: teacher requests sent as batches (OpenAI Batch API, vLLM's offline runner). A batch is recorded
-- with its custom ids (= rationale ids) before it is uploaded and before it is created, so a killed run resumes the
-- same batch — polls it, or adopts the one the server already created for it — and never submits it twice.
create table teacher_batches (
    batch_key      varchar primary key,   -- keystep's own id, also the batch's metadata on the server
    teacher_fp     varchar not null,
    runner         varchar not null,      -- openai (Batch API) | vllm (run_batch)
    endpoint       varchar,               -- the base URL it went to
    custom_ids     varchar[] not null,
    request_path   varchar not null,      -- the request JSONL, kept until the batch is finished
    input_file_id  varchar,
    batch_id       varchar,
    status         varchar not null,      -- prepared | uploaded | submitted | finished
    server_status  varchar,               -- the server's last word: validating, in_progress, completed, failed, expired, cancelled
    request_counts varchar,               -- JSON {total, completed, failed}
    output_path    varchar,               -- downloaded output lines (JSONL)
    error_path     varchar,               -- downloaded error lines (JSONL)
    error          varchar,
    created_at     timestamp default current_timestamp,
    updated_at     timestamp default current_timestamp
);
