select count(*) as n,
       count(*) filter (where status = 'ok') as n_ok,
       count(*) filter (where status = 'failed') as n_failed,
       count(*) filter (where correct) as n_correct
from rationales
where teacher_fp = $teacher_fp;
