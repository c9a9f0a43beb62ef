-- schema version 4: KPOD §4.3 progressive curriculum. One row per (stage, rationale): how many leading
-- rationale steps are given as input (no loss) at that stage; the student generates the rest.
create table curriculum (
    fp            varchar not null,
    stage         integer not null,
    example_id    varchar not null,
    rationale_id  varchar not null,
    prefix_steps  integer not null,
    primary key (fp, stage, rationale_id)
);
