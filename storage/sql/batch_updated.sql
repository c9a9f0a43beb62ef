-- A batch moves on: what the server said (null keeps the value).
update teacher_batches
set status = coalesce($status, status),
    input_file_id = coalesce($input_file_id, input_file_id),
    batch_id = coalesce($batch_id, batch_id),
    server_status = coalesce($server_status, server_status),
    request_counts = coalesce($request_counts, request_counts),
    output_path = coalesce($output_path, output_path),
    error_path = coalesce($error_path, error_path),
    error = coalesce($error, error),
    updated_at = current_timestamp
where batch_key = $batch_key;
