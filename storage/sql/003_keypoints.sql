-- schema version 3: KPOD token weights (§4.1) and step difficulty (§4.2).
create table token_weights (
    weights_fp    varchar not null,
    rationale_id  varchar not null,
    token_start   integer not null,    -- index of the first rationale token in <bos> prompt target <eos>
    weights       float[] not null,    -- one weight per rationale token
    keypoints     integer[] not null,  -- top-k token indices within the rationale
    primary key (weights_fp, rationale_id)
);

create table step_difficulty (
    difficulty_fp varchar not null,
    rationale_id  varchar not null,
    step_index    integer not null,
    difficulty    double not null,
    n_tokens      integer not null,
    primary key (difficulty_fp, rationale_id, step_index)
);
