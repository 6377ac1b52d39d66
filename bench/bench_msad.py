"""MSAD step cost (forward + backward): the released per-position loop against xstars' variants.

The released loop (with its gradient restored: ``torch.stack`` instead of ``torch.tensor``)
projects and compares one token position at a time, 197 times per step. ``original`` is the
same formulation vectorised over positions and sensor pairs; ``dense`` is the contrastive
variant with its default smaller heads and a subset of positions. All run on the same tensors.

    python bench/bench_msad.py [--batch 64] [--tokens 197] [--dim 384] [--repeats 3] [--device cpu]

Prints one JSON line per method and the ratios to the loop, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from xstars.losses import MSADHead, msad_pair_original, msad_total


def released_loop(tokens_a: torch.Tensor, tokens_b: torch.Tensor, head: MSADHead) -> torch.Tensor:
    """The released computation, position by position, gradient kept (torch.stack)."""
    losses = []
    for t in range(tokens_a.shape[1]):
        a, b = head(tokens_a[:, t], 0), head(tokens_b[:, t], 1)
        logits = b @ a.T
        targets = F.softmax((a @ a.T + b @ b.T) / 2, dim=-1)
        losses.append((F.cross_entropy(logits, targets, label_smoothing=0.3)
                       + F.cross_entropy(logits.T, targets.T, label_smoothing=0.3)) / 2)
    return torch.stack(losses).mean()


def timed(fn, tokens: list[torch.Tensor], repeats: int, device: torch.device) -> float:
    def once() -> None:
        for t in tokens:
            t.grad = None
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (allocations, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    tokens_a = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)
    tokens_b = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)
    head_1024 = MSADHead(args.dim, 1024).to(device)
    head_256 = MSADHead(args.dim, 256, dropout=0.0).to(device)
    methods = {
        "released_loop": lambda: released_loop(tokens_a, tokens_b, head_1024),
        "original_vectorised": lambda: msad_pair_original(head_1024(tokens_a, 0), head_1024(tokens_b, 1)),
        "dense_256_all_tokens": lambda: msad_total({"a": tokens_a, "b": tokens_b}, {}, head_256, variant="dense",
                                                   tau=0.1, tokens_per_tile=0),
        "dense_256_49_tokens": lambda: msad_total({"a": tokens_a, "b": tokens_b}, {}, head_256, variant="dense",
                                                  tau=0.1, tokens_per_tile=49),
    }
    results = {name: timed(fn, [tokens_a, tokens_b], args.repeats, device) for name, fn in methods.items()}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    for name, seconds in results.items():
        print(json.dumps({"method": name, "seconds": round(seconds, 4), "speedup_vs_loop": round(
            results["released_loop"] / seconds, 2), "batch": args.batch, "tokens": args.tokens, "dim": args.dim,
            "device": machine, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
