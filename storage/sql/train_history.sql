-- Per epoch metrics of one training run (loss, tokens, supervised tokens, ...), in epoch order.
select epoch, metrics_json
from checkpoints
where train_fp = $train_fp
order by epoch;
