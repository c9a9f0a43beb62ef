-- keystep catalog, schema version 1.
-- Every stage output is keyed by its fingerprint; a stage's rows and its stage_outputs row are written in one
-- transaction, so a killed run leaves either all of them or none.

create table stage_outputs (
    fingerprint   varchar primary key,
    stage         varchar not null,
    code_version  varchar not null,
    config_json   varchar not null,
    upstream_json varchar not null,
    summary_json  varchar,
    flow_run_id   varchar,
    created_at    timestamp default current_timestamp
);

create table datasets (
    dataset_fp    varchar primary key,
    name          varchar not null,
    source        varchar not null,
    path          varchar,
    split         varchar not null,
    content_hash  varchar,
    n_examples    integer not null,
    n_bad         integer not null,
    bad_reasons_json varchar not null,
    created_at    timestamp default current_timestamp
);

create table examples (
    dataset_fp    varchar not null,
    example_id    varchar not null,
    row_index     integer not null,
    question      varchar not null,
    answer        varchar not null,
    answer_value  double,
    answer_type   varchar not null,
    choices_json  varchar,
    reference_rationale varchar,
    source        varchar not null,
    split         varchar not null,
    meta_json     varchar,
    primary key (dataset_fp, example_id)
);

create table bad_rows (
    dataset_fp    varchar not null,
    row_index     integer not null,
    reason        varchar not null,
    raw           varchar
);

create table rationales (
    rationale_id  varchar primary key,
    teacher_fp    varchar not null,
    example_id    varchar not null,
    sample_index  integer not null,
    prompt        varchar not null,
    text          varchar,
    params_json   varchar,
    usage_json    varchar,
    latency_s     double,
    finish_reason varchar,
    extracted_answer varchar,
    correct       boolean,
    status        varchar not null,   -- ok | failed
    reason        varchar
);

create table steps (
    steps_fp      varchar not null,
    rationale_id  varchar not null,
    step_index    integer not null,
    text          varchar not null,
    char_start    integer not null,
    char_end      integer not null,
    token_start   integer,
    token_end     integer,
    primary key (steps_fp, rationale_id, step_index)
);

create table runs (
    run_id        varchar primary key,
    flow_run_id   varchar,
    config_json   varchar not null,
    status        varchar not null,
    started_at    timestamp default current_timestamp,
    finished_at   timestamp,
    summary_json  varchar
);

create table checkpoints (
    train_fp      varchar not null,
    epoch         integer not null,
    path          varchar not null,
    config_json   varchar not null,
    metrics_json  varchar,
    created_at    timestamp default current_timestamp,
    primary key (train_fp, epoch)
);

create table eval_results (
    eval_fp       varchar not null,
    model_label   varchar not null,
    dataset       varchar not null,
    split         varchar not null,
    group_key     varchar not null,   -- 'all' or 'n_steps'
    group_value   varchar not null,
    n             integer not null,
    n_correct     integer not null,
    accuracy      double not null
);

create table predictions (
    eval_fp       varchar not null,
    model_label   varchar not null,
    dataset       varchar not null,
    example_id    varchar not null,
    prompt        varchar not null,
    output        varchar not null,
    extracted     varchar,
    gold          varchar not null,
    correct       boolean not null
);
