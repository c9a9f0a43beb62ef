-- Drop the index row of an on-policy epoch about to be written again (a resumed run re-samples a killed epoch).
delete from on_policy_samples
where train_fp = $train_fp and epoch = $epoch;
