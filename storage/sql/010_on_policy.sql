-- schema version 10: the student's own samples of on-policy distillation (train.loss: on_policy, issue 31), one
-- Parquet file per training epoch (<workspace>/on-policy/<train_fp>/epoch-N.parquet); their teacher scores are in
-- teacher_scores, by sequence hash, as any scored sequence's.
create table on_policy_samples (
    train_fp   varchar not null,
    epoch      integer not null,
    part       varchar not null,   -- the Parquet file (relative to the workspace)
    n_samples  integer not null,
    n_correct  integer not null,   -- samples whose answer is the gold one
    primary key (train_fp, epoch)
);
