"""Full training step: DINO + MSAD against DINO alone, same model, batch and views.

One step = student forward/backward on every crop (and, with MSAD, on the other sensors'
paired views), teacher forward on the global crops, DINO loss (+ alpha x MSAD), AdamW step and
EMA update: what xstars/train.py does, on random tensors (the loader is measured apart, in
bench_loader.py). Sensors as in the real config: DINO views of Sentinel-2 (10 bands), paired
orthophoto (4 bands, 224 px, or 112) and Landsat (7 bands, 112 px: its footprint is 80 pixels).

    python bench/bench_step.py [--arch vit_small] [--batch 8] [--repeats 3] [--device cpu|cuda] [--amp bf16]
                               [--only xstars_dense_3_sensors ...]

Prints one JSON line per configuration: seconds per step (best of the rounds), images/s (every
view counted), peak GPU memory, and the ratio to DINO alone: the configurations are measured
round-robin, and the ratio is the median over rounds of each round's ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from xstars.losses import DINOLoss, MSADHead, make_msad_loss
from xstars.model import DINOHead, Teacher, ViT, XStars, ema_update
from xstars.train import param_groups

BANDS = {"s2": 10, "ign": 4, "l8": 7}


def make_student(arch: str, msad: dict, out_dim: int) -> XStars:
    backbone = ViT(BANDS, arch=arch, img_size=224, drop_path=0.1)
    variant = msad[msad["variant"]]
    return XStars(backbone, DINOHead(backbone.embed_dim, out_dim), MSADHead(backbone.embed_dim, variant["proj_dim"],
                                                                          variant["dropout"]), make_msad_loss(msad))


def make_step(config: dict, args: argparse.Namespace, device: torch.device):
    """The model, optimiser and tensors of ``config``, and a function running one step on them."""
    torch.manual_seed(0)
    student = make_student(args.arch, config["msad"], args.out_dim).to(device)
    teacher = Teacher(student).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4)
    loss_fn = DINOLoss(args.out_dim, 2 + args.local_crops, 0.04, 0.04, 0, 1).to(device)
    b = args.batch
    crops = [torch.randn(b, BANDS["s2"], 224, 224, device=device) for _ in range(2)]
    crops += [torch.randn(b, BANDS["s2"], 96, 96, device=device) for _ in range(args.local_crops)]
    paired = {s: torch.randn(b, BANDS[s], px, px, device=device) for s, px in config["paired"].items()}
    valid = {s: torch.ones(b, px, px, device=device) for s, px in {"s2": 224, **config["paired"]}.items()}
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

    once()  # warm-up
    return once


def timed(once, device: torch.device) -> tuple[float, int | None]:
    """Seconds of one step, and its peak GPU memory (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    once()
    seconds = time.perf_counter() - start
    return seconds, round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    parser.add_argument("--only", nargs="*", default=[], help="configurations to run beside dino_only")
    args = parser.parse_args()
    device = torch.device(args.device)
    original = {"variant": "original", "alpha": 0.1, "original": {"proj_dim": 1024, "tau": 1.0, "label_smoothing": 0.3,
                                                                   "dropout": 0.1}}
    dense = {"variant": "dense", "alpha": 0.1, "dense": {"proj_dim": 256, "tau": 0.1, "tokens_per_tile": 49,
                                                         "gather": False, "dropout": 0.0}}
    # Paired views at their sizes: the orthophoto at 224 (or 112), Landsat at 112 (its 2240 m
    # footprint is 80 pixels); MSAD pools the token grids to the coarsest.
    configs = {
        "dino_only": {"msad": {**original, "alpha": 0.0}, "paired": {}},
        "xstars_original_3_sensors": {"msad": original, "paired": {"ign": 224, "l8": 112}},
        "xstars_dense_3_sensors": {"msad": dense, "paired": {"ign": 224, "l8": 112}},
        "xstars_dense_3_sensors_paired_112": {"msad": dense, "paired": {"ign": 112, "l8": 112}},
        # config.yaml's xstars_dense run: one other sensor per step (msad.pairs_per_step 1) at 112 px.
        "xstars_dense_one_pair_112": {"msad": dense, "paired": {"ign": 112}},
    }
    if args.only:
        configs = {name: configs[name] for name in ["dino_only", *args.only]}
    steps = {name: make_step(config, args, device) for name, config in configs.items()}
    # Round-robin over the configurations, best of the repeats: a slow spell of the machine
    # hits every configuration alike instead of one.
    times: dict[str, list[tuple[float, int | None]]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, once in steps.items():
            times[name].append(timed(once, device))
    results = {}
    for name, config in configs.items():
        best = min(t for t, _ in times[name])
        images = args.batch * (2 + args.local_crops + (len(config["paired"]) if config["msad"]["alpha"] > 0 else 0))
        results[name] = {"seconds": round(best, 4), "images_per_s": round(images / best, 1),
                         "samples_per_s": round(args.batch / best, 2), "paired_px": config["paired"],
                         "peak_gpu_mib": max(m for _, m in times[name]) if device.type == "cuda" else None}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    for name, result in results.items():
        # The ratio of each round (the configurations measured back to back), median over rounds:
        # steadier than a ratio of bests on a machine whose speed drifts.
        ratios = sorted(t / d for (t, _), (d, _) in zip(times[name], times["dino_only"], strict=True))
        print(json.dumps({"config": name, **result, "ratio_to_dino_only": round(
            statistics.median(ratios), 3), "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)], "arch": args.arch, "batch": args.batch,
            "local_crops": args.local_crops, "amp": args.amp if device.type == "cuda" else "none", "device": machine,
            "torch": torch.__version__}))


if __name__ == "__main__":
    main()
