-- Parquet shards of one curriculum, one folder per stage (stage=N/), written by DuckDB itself.
copy (
    select stage, example_id, rationale_id, prefix_steps
    from curriculum
    where fp = $fp
    order by stage, rationale_id
) to '{target}' (format parquet, partition_by (stage));
