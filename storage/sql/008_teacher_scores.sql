-- schema version 8: teacher scores (issue 30) — a teacher's top-k next-token log-probabilities over token sequences,
-- kept in Parquet part files beside the catalog (<workspace>/teacher-scores/<scorer_fp>/part-*.parquet). The catalog
-- indexes which sequences a scorer has scored and in which part, so no sequence is ever scored twice.
create table teacher_scores (
    scorer_fp     varchar not null,   -- the teacher model's content, k and the scoring code
    sequence_hash varchar not null,   -- hash of the token ids scored
    part          varchar not null,   -- the Parquet file holding its row (relative to the workspace)
    n_positions   integer not null,   -- positions scored: every token but the first is predicted
    primary key (scorer_fp, sequence_hash)
);
