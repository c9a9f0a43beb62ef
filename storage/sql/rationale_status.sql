-- Stored status of the given rationale ids (the spool's finished parts are checked against it before ingest).
select rationale_id, status
from rationales
where rationale_id in (select unnest($ids));
