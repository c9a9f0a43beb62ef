-- Every batch of one teacher, oldest first (open ones to resume, finished ones whose output lines can be read again).
select batch_key, runner, endpoint, custom_ids, request_path, input_file_id, batch_id, status, server_status,
       request_counts, output_path, error_path
from teacher_batches
where teacher_fp = $teacher_fp
order by created_at, batch_key;
