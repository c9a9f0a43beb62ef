-- Whether a stage output was made before the run started (so the run took it from the cache).
select coalesce((select created_at from stage_outputs where fingerprint = $fingerprint)
                < (select started_at from runs where run_id = $run_id), false) as before;
