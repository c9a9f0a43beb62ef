-- Failed rationales per reason, for one teacher over one dataset.
select r.reason, count(*) as n
from rationales r
join examples e on e.example_id = r.example_id and e.dataset_fp = $dataset_fp
where r.teacher_fp = $teacher_fp
  and r.status = 'failed'
group by r.reason
order by n desc;
