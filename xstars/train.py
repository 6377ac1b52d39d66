"""Train: X-STARS pretraining (DINO + alpha * MSAD), one readable loop.

    for each step:
        batch    <- PretrainBatches (DINO crops of one sensor + other sensors' paired views)
        student  <- XStars.forward: DINO outputs of every crop, MSAD loss (inside the wrapped module)
        teacher  <- EMA model: DINO outputs of the global crops (no gradient)
        loss     = DINOLoss(student, teacher) + alpha * MSAD
        backward, clip, (last layer frozen the first epoch), AdamW step, EMA update

Schedules (learning rate with warm-up then cosine, weight decay cosine, teacher momentum
cosine to 1) are arrays indexed by the global step, computed once, as in DINO. Random numbers
are re-seeded from (seed, rank, step) at every step, and the data of a step is a pure function
of (seed, epoch, rank, step): a run resumed from a checkpoint continues exactly as the
uninterrupted run would have (bit for bit on CPU).

Multi-GPU: started by ``torchrun``, one process per GPU (gloo on CPU); the student is wrapped
in DistributedDataParallel and called through the wrapper; the teacher is updated identically
on every rank from synchronised student weights.

Outputs in ``out_dir``: ``checkpoint.pt`` (atomic, every ``checkpoint_every_steps`` and at the
end), ``metrics.jsonl`` (one line per step), ``backbone.safetensors`` + ``backbone.json``
(the teacher's backbone, with the sensors, bands and normalisation it expects).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xstars.config import run_bands
from xstars.data import BatchPlan, PretrainBatches, ViewSpec, sensor_infos
from xstars.errors import DataError
from xstars.losses import DINOLoss, MSADHead, make_msad_loss
from xstars.model import (
    DINOHead,
    Teacher,
    ViT,
    XStars,
    convert_state_dict,
    ema_update,
    export_backbone,
    load_backbone,
    read_weights,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


# ================================================================================ schedules


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per step: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``."""
    warmup = np.linspace(warmup_start, base, round(warmup_epochs * steps_per_epoch), endpoint=False)
    rest = epochs * steps_per_epoch - len(warmup)
    steps = np.arange(rest)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(rest, 1)))
    return np.concatenate([warmup, cosine])


# ============================================================================ distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """From torchrun's environment: NCCL on GPUs, gloo on CPU; one process without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def _barrier(dist_info: Dist) -> None:
    if dist_info.world_size > 1:
        torch.distributed.barrier()


# ================================================================================== model


def build_student(settings: Mapping[str, Any], sensor_bands: Mapping[str, int]) -> XStars:
    model, views, msad = settings["model"], settings["views"], settings["msad"]
    backbone = ViT(sensor_bands, arch=model["arch"], patch_size=model["patch_size"], img_size=views["global_px"],
                   drop_path=model["drop_path"])
    dino_head = DINOHead(backbone.embed_dim, model["dino_out_dim"], model["dino_hidden_dim"],
                         model["dino_bottleneck_dim"], model["norm_last_layer"])
    variant = msad[msad["variant"]]
    msad_head = MSADHead(backbone.embed_dim, variant["proj_dim"], variant["dropout"])
    return XStars(backbone, dino_head, msad_head, make_msad_loss(msad))


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only (not on biases, norms, tokens): DINO's groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith((".bias", "cls_token", "pos_embed")) or p.ndim == 1
         else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# =================================================================================== train


def pretrain(store: Path | str, settings: Mapping[str, Any], out_dir: Path | str, *, seed: int = 0,
             init_checkpoint: Path | str | None = None, max_steps: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train one run (``settings`` = :func:`xstars.config.run_settings`) and export its backbone.

    Resumes from ``out_dir/checkpoint.pt`` when present. ``max_steps`` stops early (a
    checkpoint is written there, as at any interruption point), for tests and time budgets.
    ``init_checkpoint``: the source weights of continual mode (a path; from ``continual``).
    """
    dist_info = init_distributed()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    optim = settings["optim"]
    sensors = list(settings["sensors"])
    continual = settings["mode"] == "continual"
    source = settings["continual"]["source_sensor"] if continual else None
    dino_sensors = list(settings["dino_sensors"])
    paired = {s: ([source] if continual else [o for o in sensors if o != s]) if settings["msad"]["alpha"] > 0
              else [] for s in dino_sensors}

    infos = sensor_infos(store, sensors, run_bands(settings))
    torch.manual_seed(seed)  # same initial weights on every rank
    student = build_student(settings, {s: len(i.bands) for s, i in infos.items()})
    frozen = None
    if continual:
        path = init_checkpoint or settings["continual"]["checkpoint"]
        state, layout = convert_state_dict(read_weights(path), source, settings["continual"]["layout"])
        load_backbone(student.backbone, state, new_sensors=[s for s in sensors if s != source], source=str(path))
        # The frozen copy is the loaded source model, never the student being trained (defect 7).
        frozen = copy.deepcopy(student.backbone).eval().requires_grad_(False).to(device)
        log.info("continual: loaded %s (%s layout) for %s; frozen copy gives its features", path, layout, source)
    student.to(device)
    teacher = Teacher(student).to(device)  # starts as the student (after loading, in continual mode)

    views = ViewSpec.from_config(settings["views"])
    loss_fn = DINOLoss(settings["model"]["dino_out_dim"], 2 + views.local_crops, settings["dino"]["teacher_temp"],
                       settings["dino"]["warmup_teacher_temp"], settings["dino"]["warmup_teacher_temp_epochs"],
                       optim["epochs"], settings["dino"]["student_temp"], settings["dino"]["center_momentum"]).to(device)

    workers = settings["loader"]["num_workers"]
    plan = BatchPlan(sensors, dino_sensors, paired, views, optim["batch_size_per_gpu"], optim["epochs"], seed,
                     splits=settings["splits"], bands=run_bands(settings), num_workers=workers, rank=dist_info.rank,
                     world_size=dist_info.world_size, shuffle_buffer=settings["loader"]["shuffle_buffer"],
                     pairs_per_step=settings["msad"]["pairs_per_step"])
    dataset = PretrainBatches(store, plan)
    steps_per_epoch = dataset.steps_per_epoch
    total_steps = optim["epochs"] * steps_per_epoch
    batch_total = optim["batch_size_per_gpu"] * dist_info.world_size
    lr = cosine_schedule(optim["lr"] * batch_total / 256, optim["min_lr"], optim["epochs"], steps_per_epoch,
                         optim["warmup_epochs"])
    wd = cosine_schedule(optim["weight_decay"], optim["weight_decay_end"], optim["epochs"], steps_per_epoch)
    momentum = cosine_schedule(optim["momentum_teacher"], 1.0, optim["epochs"], steps_per_epoch)

    # Every step uses every parameter unless some sensor sits out a step (DINO-only runs,
    # continual mode, fewer pairs per step): DDP must then look for unused parameters.
    pairs = settings["msad"]["pairs_per_step"]
    uses_all = (all(len(paired[s]) + 1 == len(sensors) for s in dino_sensors) and not continual
                and not 0 < pairs < len(sensors) - 1)
    model: nn.Module = student
    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[dist_info.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=not uses_all or settings["msad"]["alpha"] == 0)
    optimizer = torch.optim.AdamW(param_groups(student))
    amp = settings["amp"] if device.type == "cuda" else "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    start = 0
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["dino_loss"])
        if frozen is not None:
            frozen.load_state_dict(state["frozen"])
        start = int(state["step"])
        if state["steps_per_epoch"] != steps_per_epoch:
            raise DataError(f"{checkpoint_path}: written with {state['steps_per_epoch']} steps per epoch, this run "
                            f"has {steps_per_epoch} (store, batch size, GPUs or workers changed): start afresh")
        log.info("resumed from %s at step %d/%d", checkpoint_path, start, total_steps)
    end = total_steps if max_steps is None else min(total_steps, max_steps)
    metrics_path = out_dir / METRICS
    if dist_info.main:
        _truncate_metrics(metrics_path, start)

    def save(step: int) -> None:
        if dist_info.main:
            state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "dino_loss": loss_fn.state_dict(), "step": step, "steps_per_epoch": steps_per_epoch,
                     "total_steps": total_steps, "settings": json.loads(json.dumps(settings)),
                     "world_size": dist_info.world_size}
            if frozen is not None:
                state["frozen"] = frozen.state_dict()
            tmp = checkpoint_path.with_suffix(".pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, checkpoint_path)  # atomic: a crash leaves the previous checkpoint whole
        _barrier(dist_info)

    dataset.start_step = start  # the batches after the checkpoint's step, as the uninterrupted run saw them
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    bar = None
    if progress and dist_info.main and start < end:
        from tqdm import tqdm

        bar = tqdm(total=end - start, desc=f"pretrain {out_dir.name}", unit="step")
    run = Run(student=student, teacher=teacher, model=model, frozen=frozen, optimizer=optimizer, scaler=scaler,
              loss_fn=loss_fn, lr=lr, wd=wd, momentum=momentum, settings=settings, device=device,
              amp_dtype=amp_dtype, seed=seed, rank=dist_info.rank, world_size=dist_info.world_size,
              steps_per_epoch=steps_per_epoch)
    student.train()
    last_saved = start
    with metrics_path.open("a") if dist_info.main else open(os.devnull, "w") as metrics:

        def after_step(step: int, record: dict[str, Any]) -> None:
            nonlocal last_saved
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", msad=f"{record['msad']:.4f}")
            if (step + 1) % settings["checkpoint_every_steps"] == 0:
                save(step + 1)
                last_saved = step + 1

        batches = iter(loader)
        for epoch in range(start // steps_per_epoch, math.ceil(end / steps_per_epoch)):
            steps = range(max(start, epoch * steps_per_epoch), min(end, (epoch + 1) * steps_per_epoch))
            train_one_epoch(run, batches, epoch, steps, after_step)
    if bar is not None:
        bar.close()
    final_step = max(min(end, total_steps), start)
    if last_saved != final_step or not checkpoint_path.exists():
        save(final_step)
    summary = {"steps": final_step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
               "world_size": dist_info.world_size, "complete": final_step >= total_steps}
    if dist_info.main and final_step >= total_steps:
        export_backbone(teacher.backbone, infos, settings, out_dir, summary)
    _barrier(dist_info)
    return summary


@dataclass
class Run:
    """What a training step works on: the networks, the optimiser, the loss and the schedules."""

    student: XStars
    teacher: Teacher
    model: nn.Module  # the student, wrapped in DDP when there are several processes
    frozen: ViT | None  # continual mode: the loaded source model, which gives the paired features
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: DINOLoss
    lr: np.ndarray  # per step
    wd: np.ndarray
    momentum: np.ndarray
    settings: Mapping[str, Any]
    device: torch.device
    amp_dtype: torch.dtype | None
    seed: int
    rank: int
    world_size: int
    steps_per_epoch: int


def train_one_epoch(run: Run, batches: Iterator[dict[str, Any]], epoch: int, steps: range,
                    after_step: Callable[[int, dict[str, Any]], None]) -> None:
    """The ``steps`` of one epoch (all of them, or the rest of it after a resume), as DINO's
    loop: schedules, forward (DINO on the crops of the batch's sensor, MSAD on its paired
    views), backward with clipping, the teacher's EMA; ``after_step`` gets each step's record."""
    optim = run.settings["optim"]
    tick = time.perf_counter()
    for step in steps:
        batch = next(batches, None)
        if batch is None or (batch["epoch"], batch["epoch"] * run.steps_per_epoch + batch["step"]) != (epoch, step):
            got = "nothing" if batch is None else f"epoch {batch['epoch']} step {batch['step']}"
            raise RuntimeError(f"data order broken: got {got} at {step}")
        # Drop-path, dropout and MSAD's token draws: a function of the step, so resuming is exact.
        torch.manual_seed(int(np.random.SeedSequence([run.seed, run.rank, step]).generate_state(1)[0]))
        for i, group in enumerate(run.optimizer.param_groups):
            group["lr"] = float(run.lr[step])
            if i == 0:
                group["weight_decay"] = float(run.wd[step])

        dino, msad = _losses(run, batch, epoch)
        loss = dino + run.settings["msad"]["alpha"] * msad
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (dino {dino.item()}, msad {msad.item()})")

        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(run.student.parameters(), optim["clip_grad"])
                     if optim["clip_grad"] > 0 else torch.tensor(0.0))
        if epoch < optim["freeze_last_layer_epochs"]:
            for p in run.student.dino_head.last_layer.parameters():
                p.grad = None
        run.scaler.step(run.optimizer)
        run.scaler.update()
        ema_update(run.teacher, run.student, float(run.momentum[step]))

        now = time.perf_counter()
        after_step(step, {
            "step": step + 1, "epoch": epoch, "sensor": batch["sensor"], "loss": round(loss.item(), 6),
            "dino": round(dino.item(), 6), "msad": round(msad.item(), 6), "lr": float(run.lr[step]),
            "wd": float(run.wd[step]), "momentum": float(run.momentum[step]), "grad_norm": round(float(grad_norm), 6),
            "samples_per_s": round(len(batch["index"]) * run.world_size / (now - tick), 3)})
        tick = now


def _losses(run: Run, batch: Mapping[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's loss on the batch's crops against the teacher, and MSAD's on its paired views."""
    device = run.device
    sensor = batch["sensor"]
    crops = [c.to(device, non_blocking=True) for c in batch["crops"]]
    paired_views = {s: v.to(device, non_blocking=True) for s, v in batch["paired"].items()}
    valid = {s: v.to(device, non_blocking=True) for s, v in batch["valid"].items()}
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        frozen_tokens = None
        if run.frozen is not None and paired_views:
            with torch.no_grad():
                frozen_tokens = {s: run.frozen(v, s) for s, v in paired_views.items()}
            paired_views = {}
        out = run.model(sensor, crops, paired_views, valid, frozen_tokens)
        teacher_out = run.teacher(sensor, crops[:2])
    return run.loss_fn(out.dino, teacher_out, epoch), out.msad.float()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


# ================================================================================= export


def steps_done(out_dir: Path) -> int:
    """The step of a run's checkpoint (0 when none)."""
    path = Path(out_dir) / CHECKPOINT
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"]) if path.exists() else 0
