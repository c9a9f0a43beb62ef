-- schema version 9: the teacher's top-k log-probabilities captured while it generated (teacher.logprobs, issue 30),
-- kept in Parquet part files beside the catalog (<workspace>/teacher-logprobs/<teacher_fp>/part-*.parquet); the
-- catalog indexes which rationale's tokens are in which part.
create table generation_logprobs (
    rationale_id  varchar primary key,
    teacher_fp    varchar not null,
    part          varchar not null,   -- the Parquet file holding its row (relative to the workspace)
    n_tokens      integer not null,   -- generated tokens captured
    k             integer not null,   -- log-probabilities asked per token
    ids_known     boolean not null    -- token ids (vLLM), else the endpoint's token strings
);
