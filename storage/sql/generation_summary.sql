-- Totals of one teacher's rationales over one dataset's examples.
with scoped as (
    select r.*
    from rationales r
    join examples e on e.example_id = r.example_id and e.dataset_fp = $dataset_fp
    where r.teacher_fp = $teacher_fp
)
select count(*) as n,
       count(*) filter (where status = 'ok') as n_ok,
       count(*) filter (where correct) as n_correct,
       sum(try_cast(json_extract(usage_json, '$.prompt_tokens') as bigint)) as prompt_tokens,
       sum(try_cast(json_extract(usage_json, '$.completion_tokens') as bigint)) as completion_tokens,
       avg(latency_s) as mean_latency_s
from scoped;
