"""Two training processes under torchrun (gloo on the CPU) give the run one process gives."""
import pytest
import torch

from storage.workspace import Workspace
from tasks.train import TRAIN
from tasks.training import TrainInputs
from tests.tasks.helpers import prepared
from tests.tasks.test_train import weights


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_loss_and_weights(tmp_path, strategy):
    runs, logs = {}, []
    for n in (1, 2):
        ws = Workspace(tmp_path / f"p{n}")
        # batch 7: uneven shares (4 + 3), and a last micro-batch of 1 leaves rank 1 with nothing
        cfg, cat, gen, st = prepared(ws, n=36, **{"train.epochs": 2, "train.batch_size": 7, "train.grad_accum": 2,
                                                  "train.num_processes": n, "train.strategy": strategy})
        epochs = []
        runs[n] = TRAIN.run(ws, cfg, TrainInputs(
            generation=gen, student=st), on_epoch=lambda e, t, m: epochs.append(e), log=logs.append)
        assert epochs == [1, 2]
        assert len(cat.execute("select * from checkpoints where train_fp = ?", [runs[n].fp])) == 2
    one, two = runs[1], runs[2]
    assert [h["loss"] for h in two.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-4)
    assert [h["supervised_tokens"] for h in two.history] == [h["supervised_tokens"] for h in one.history]
    a, b = weights(one.final_dir), weights(two.final_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert any("keystep-epoch" not in line for line in logs)     # the ranks' output reached the task's log


def test_a_failing_rank_fails_the_task_with_its_output(tmp_path):
    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=16, **{"train.num_processes": 2})
    broken = st.model_copy(update={"model_dir": str(tmp_path / "missing")})
    with pytest.raises(RuntimeError, match="2 processes.*failed.*\n.*"):
        TRAIN.run(ws, cfg, TrainInputs(generation=gen, student=broken), log=lambda line: None)
