"""Full training step: DINO + MSAD against DINO alone, same model, batch and views.

One step = student forward/backward on every crop (and, with MSAD, on the other sensors'
paired views), teacher forward on the global crops, DINO loss (+ alpha x MSAD), AdamW step and
EMA update: what xstars/train.py does, on random tensors (the loader is measured apart, in
bench_loader.py). Sensors as in the real config: DINO views of Sentinel-2 (10 bands), paired
orthophoto (4 bands, 224 px) and Landsat (7 bands, 112 px: its footprint is 80 pixels).

    python bench/bench_step.py [--arch vit_small] [--batch 8] [--repeats 3] [--device cpu|cuda] [--amp bf16]

Prints one JSON line per configuration: seconds per step, images/s (every view counted),
peak GPU memory, and the ratio to DINO alone measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from xstars.losses import DINOLoss, MSADHead, make_msad_loss
from xstars.model import DINOHead, Teacher, ViT, XStars, ema_update
from xstars.train import param_groups

BANDS = {"s2": 10, "ign": 4, "l8": 7}
PAIRED_PX = {"ign": 224, "l8": 112}


def make_student(arch: str, msad: dict, out_dim: int) -> XStars:
    backbone = ViT(BANDS, arch=arch, img_size=224, drop_path=0.1)
    variant = msad[msad["variant"]]
    return XStars(backbone, DINOHead(backbone.embed_dim, out_dim), MSADHead(backbone.embed_dim, variant["proj_dim"],
                                                                          variant["dropout"]), make_msad_loss(msad))


def step_time(config: dict, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    student = make_student(args.arch, config["msad"], args.out_dim).to(device)
    teacher = Teacher(student).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4)
    loss_fn = DINOLoss(args.out_dim, 2 + args.local_crops, 0.04, 0.04, 0, 1).to(device)
    b = args.batch
    crops = [torch.randn(b, BANDS["s2"], 224, 224, device=device) for _ in range(2)]
    crops += [torch.randn(b, BANDS["s2"], 96, 96, device=device) for _ in range(args.local_crops)]
    paired = {s: torch.randn(b, BANDS[s], PAIRED_PX[s], PAIRED_PX[s], device=device) for s in config["paired"]}
    valid = {s: torch.ones(b, PAIRED_PX.get(s, 224), PAIRED_PX.get(s, 224), device=device)
             for s in ["s2", *config["paired"]]}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def once() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = student("s2", crops, paired if config["msad"]["alpha"] > 0 else {}, valid)
            teacher_out = teacher("s2", crops[:2])
        loss = loss_fn(out.dino, teacher_out, 0) + config["msad"]["alpha"] * out.msad.float()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        scaler.step(optimizer)
        scaler.update()
        ema_update(teacher, student, 0.996)
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    images = b * (2 + args.local_crops + (len(paired) if config["msad"]["alpha"] > 0 else 0))
    return {"seconds": round(best, 4), "images_per_s": round(images / best, 1), "samples_per_s": round(b / best, 2),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    args = parser.parse_args()
    device = torch.device(args.device)
    original = {"variant": "original", "alpha": 0.1, "original": {"proj_dim": 1024, "tau": 1.0, "label_smoothing": 0.3,
                                                                   "dropout": 0.1}}
    dense = {"variant": "dense", "alpha": 0.1, "dense": {"proj_dim": 256, "tau": 0.1, "tokens_per_tile": 49,
                                                         "gather": False, "dropout": 0.0}}
    configs = {
        "dino_only": {"msad": {**original, "alpha": 0.0}, "paired": []},
        "xstars_original_3_sensors": {"msad": original, "paired": ["ign", "l8"]},
        "xstars_dense_3_sensors": {"msad": dense, "paired": ["ign", "l8"]},
        "xstars_dense_l8_paired": {"msad": dense, "paired": ["l8"]},
    }
    results = {name: step_time(config, args, device) for name, config in configs.items()}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    for name, result in results.items():
        print(json.dumps({"config": name, **result, "ratio_to_dino_only": round(
            result["seconds"] / results["dino_only"]["seconds"], 3), "arch": args.arch, "batch": args.batch,
            "local_crops": args.local_crops, "amp": args.amp if device.type == "cuda" else "none", "device": machine,
            "torch": torch.__version__}))


if __name__ == "__main__":
    main()
