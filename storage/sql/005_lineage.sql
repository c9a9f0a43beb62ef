-- schema version 5: a stage's lineage is recorded exactly as it was hashed (extra inputs included), one name
-- per concept (token weights), and the never-written flow_run_id of stage_outputs is gone.
alter table stage_outputs add column extra_json varchar default '{}';
alter table stage_outputs drop column flow_run_id;
alter table token_weights rename column weights_fp to token_weights_fp;
