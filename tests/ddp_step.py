"""One X-STARS step through DistributedDataParallel; run by tests/test_ddp.py under torchrun.

usage: torchrun --nproc_per_node 2 tests/ddp_step.py STORE SETTINGS_JSON OUT_DIR

Each rank reads its own batch, computes DINO + MSAD through the DDP-wrapped model, and writes
every parameter's gradient as seen by it, so the test can compare ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from xstars.config import run_bands
from xstars.data import BatchPlan, PretrainBatches, ViewSpec
from xstars.train import build_student, init_distributed


def main(store: str, settings_json: str, out_dir: str) -> None:
    settings = json.loads(settings_json)
    dist = init_distributed()
    assert dist.world_size == 2, dist
    sensors = settings["sensors"]
    data = PretrainBatches(store, BatchPlan(
        sensors, settings["dino_sensors"], {s: [o for o in sensors if o != s] for s in settings["dino_sensors"]},
        ViewSpec.from_config(settings["views"]), settings["optim"]["batch_size_per_gpu"], epochs=1, seed=0,
        rank=dist.rank, world_size=dist.world_size))
    batch = next(iter(data))
    torch.manual_seed(0)  # same initial weights on both ranks
    student = build_student(settings, {s: len(i.bands) for s, i in data.infos.items()})
    model = torch.nn.parallel.DistributedDataParallel(student)
    out = model(batch["sensor"], batch["crops"], batch["paired"], batch["valid"])
    loss = out.dino.float().pow(2).mean() + out.msad
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "index": batch["index"], "msad": out.msad.detach(), "bands": run_bands(settings)},
               Path(out_dir) / f"rank{dist.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
