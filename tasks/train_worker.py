"""One torchrun rank of the train stage (`train.num_processes` > 1; launched by tasks/train.py through
tasks/parallel.py's `launch`). It rebuilds the stage's inputs and lineage from the JSON spec, runs the training
loop (tasks/training.py) and, on rank 0, writes the `Trained` it returns; epoch lines go to stdout for the task's
progress. It runs no Prefect code.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.train_worker spec.json out.json
"""
from __future__ import annotations

import json
import os
import sys

from keystep.config import DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace
from tasks.parallel import worker_args
from tasks.training import TrainInputs, run_training

EPOCH_LINE = "keystep-epoch "


def worker_spec(ws: Workspace, config: DistillConfig, inputs: TrainInputs, lineage: Lineage) -> dict:
    """What every rank needs, as JSON: the workspace, the resolved config, the inputs and the stage's lineage."""
    return {"workspace": str(ws.root), "config": config.model_dump(mode="json"), "inputs": inputs.model_dump(mode="json"),
            "lineage": {"stage": lineage.stage, "config": json.loads(json.dumps(lineage.config, default=_dump)),
                        "upstream": list(lineage.upstream), "code_version": lineage.code_version,
                        "extra": lineage.extra}}


def _dump(value):
    return value.model_dump(mode="json")


def main() -> None:
    spec, out_path = worker_args()
    lineage = Lineage(spec["lineage"]["stage"], spec["lineage"]["config"], tuple(spec["lineage"]["upstream"]),
                      spec["lineage"]["code_version"], spec["lineage"]["extra"])
    out = run_training(Workspace(spec["workspace"]), lineage, DistillConfig.model_validate(spec["config"]),
                       TrainInputs.model_validate(spec["inputs"]),
                       on_epoch=lambda *a: (sys.stdout.write(EPOCH_LINE + json.dumps(a) + "\n"), sys.stdout.flush()))
    if int(os.environ.get("RANK", "0")) == 0:
        out_path.write_text(out.model_dump_json())


if __name__ == "__main__":
    main()
