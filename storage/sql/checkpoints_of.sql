-- Every epoch checkpoint of one training run (its folder), in epoch order.
select epoch, path
from checkpoints
where train_fp = $train_fp
order by epoch;
