-- Tokens held in each Parquet part of a teacher's captured log-probabilities (for bytes per token).
select part, sum(n_tokens) as n_tokens
from generation_logprobs
where teacher_fp = $teacher_fp
group by part;
