"""Several training processes: torchrun launches them, DDP or FSDP2 wraps the model, rank 0 writes.

Input: `train.num_processes` and `train.strategy`. The training task (one Prefect task run, so the `gpu` tag's
concurrency limit still counts it once) starts `python -m torch.distributed.run --standalone` on `tasks/train_worker.py`
as a subprocess with a JSON spec of its inputs, streams the ranks' output into its log, and reads back the
`Trained` that rank 0 wrote. Every rank holds all the data and builds the same per-epoch order; each takes its
share of every micro-batch, and the loss divides by the whole step's supervised-token count, so the gradient
equals the one-process gradient (tests/tasks/test_parallel.py). CUDA uses NCCL, one GPU per rank; CPU uses gloo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Dist:
    """This process's place among the training processes (rank 0 of 1 when not launched by torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        """Join the process group torchrun set up (its env vars), or a single process when there is none."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ["LOCAL_RANK"])
        if not dist.is_initialized():
            if device == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        # one write per line: the ranks share torchrun's stdout
        sys.stdout.write(f"rank {dist.get_rank()} of {world} joined ({dist.get_backend()})\n")
        sys.stdout.flush()
        return cls(dist.get_rank(), world, local_rank)

    def device(self, device: str) -> str:
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (for the epoch's metrics)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64,
                         device=f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def wrap(model, dist: Dist, strategy: str):
    """DDP: a replica per rank, gradients all-reduced. FSDP2 (`fully_shard`): each decoder layer, then the root,
    sharded over the ranks. One process: the model as is."""
    if dist.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    on_cuda = next(model.parameters()).is_cuda
    return DistributedDataParallel(model, device_ids=[dist.local_rank] if on_cuda else None)


def uncompiled(model):
    """The module under torch.compile's wrapper (DDP's or FSDP's own methods live there)."""
    return getattr(model, "_orig_mod", model)


def unwrap(model):
    """The model under torch.compile and DDP wrappers (what save_pretrained is called on)."""
    model = uncompiled(model)
    return getattr(model, "module", model)


def no_grad_sync(model, dist: Dist, sync: bool):
    """Skip the gradient all-reduce on the micro-batches before a step's last one (grad_accum > 1)."""
    if dist.world == 1 or sync:
        return nullcontext()
    inner = uncompiled(model)
    if hasattr(inner, "no_sync"):   # DDP
        return inner.no_sync()
    inner.set_requires_gradient_sync(False)   # FSDP2: re-enabled below before the last micro-batch
    return nullcontext()


def resync(model, dist: Dist) -> None:
    inner = uncompiled(model)
    if dist.world > 1 and hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(True)


def full_state(model, optimizer, dist: Dist) -> tuple[dict | None, dict | None]:
    """(model state dict, optimizer state dict) of the whole model; under FSDP gathered to rank 0 on the CPU (every
    rank must call this). One process or DDP: the plain state dicts."""
    if dist.world == 1 or not _is_fsdp(model):
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer(model, optimizer, state: dict, dist: Dist) -> None:
    if dist.world == 1 or not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _is_fsdp(model) -> bool:
    return hasattr(uncompiled(model), "set_requires_gradient_sync")


# ---- the launcher (the training task's side) ----------------------------------------------------------
def launch(module: str, spec: dict, num_processes: int, device: str, log: Callable[[str], None]) -> dict:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node N -m <module> <spec.json> <out.json>`;
    stream its output lines to `log`; return what rank 0 wrote to out.json. A failed rank fails the call with the
    output's tail (the checkpoints already published stay, so a rerun resumes)."""
    if device == "cuda":
        import torch
        if torch.cuda.device_count() < num_processes:
            raise ValueError(f"config key 'train.num_processes': {num_processes} processes need {num_processes} GPUs, "
                             f"but {torch.cuda.device_count()} are visible; lower it or expose more GPUs")
    with tempfile.TemporaryDirectory(prefix="keystep-launch-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
               "-m", module, str(spec_path), str(out_path)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        tail: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                log(line.rstrip())
                tail = (tail + [line.rstrip()])[-30:]
        if proc.returncode or not out_path.exists():
            raise RuntimeError(f"distributed training ({num_processes} processes) failed with exit code "
                               f"{proc.returncode}; the last lines:\n" + "\n".join(tail))
        return json.loads(out_path.read_text())


def worker_args() -> tuple[dict[str, Any], Path]:
    """The rank's side: (spec, path rank 0 writes its result to) from argv."""
    return json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
