-- A batch about to be uploaded: its request file and custom ids, before anything is sent.
insert into teacher_batches (batch_key, teacher_fp, runner, endpoint, custom_ids, request_path, status)
values ($batch_key, $teacher_fp, $runner, $endpoint, $custom_ids, $request_path, 'prepared');
