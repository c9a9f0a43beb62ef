-- Which of the given token sequences a scorer has already scored, and in which Parquet part.
select sequence_hash, part, n_positions
from teacher_scores
where scorer_fp = $scorer_fp
  and sequence_hash in (select unnest($hashes));
