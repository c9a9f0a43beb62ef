-- Positions held in each Parquet part of a scorer (for bytes per position).
select part, sum(n_positions) as n_positions
from teacher_scores
where scorer_fp = $scorer_fp
group by part;
