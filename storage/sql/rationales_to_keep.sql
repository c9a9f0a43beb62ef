-- Rationale ids of one teacher that a run must not ask for again: every stored row, except — with $retry_failed —
-- the rows whose last attempt ended in a protocol fault (a malformed or empty reply, after its retries).
select rationale_id
from rationales
where teacher_fp = $teacher_fp
  and not ($retry_failed and status = 'failed'
           and (reason like 'malformed response%' or reason like 'empty response%'));
