"""MSAD: the released formulation with its defects fixed, checked against a per-position loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xstars.losses import (
    MSADHead,
    align_token_grids,
    msad_loss,
    msad_pair_dense,
    msad_pair_original,
    msad_total,
)


def reference_pair(emb_a: torch.Tensor, emb_b: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The released per-position loop, written plainly, with torch.stack (graph kept)."""
    losses = []
    for t in range(emb_a.shape[1]):
        a, b = emb_a[:, t], emb_b[:, t]
        logits = b @ a.T / tau
        targets = F.softmax((a @ a.T + b @ b.T) / 2 * tau, dim=-1)
        rows = F.cross_entropy(logits, targets, label_smoothing=0.3)
        cols = F.cross_entropy(logits.T, targets.T, label_smoothing=0.3)
        losses.append((rows + cols) / 2)
    return torch.stack(losses).mean()


def test_vectorised_pair_loss_equals_the_per_position_loop() -> None:
    torch.manual_seed(0)
    emb_a, emb_b = torch.randn(6, 197, 32), torch.randn(6, 197, 32)
    for tau in (1.0, 0.2):
        expected = reference_pair(emb_a, emb_b, tau)
        assert torch.allclose(msad_pair_original(emb_a, emb_b, tau), expected, atol=1e-5, rtol=1e-5)


def test_msad_alone_trains_the_backbone_and_the_heads() -> None:
    torch.manual_seed(0)
    backbone = nn.Linear(8, 16)  # stands for the shared transformer
    head = MSADHead(16, proj_dim=32)
    images = {"s2": torch.randn(4, 17, 8), "ign": torch.randn(4, 17, 8)}
    loss = msad_loss({sensor: backbone(x) for sensor, x in images.items()}, head)
    loss.backward()
    assert loss.requires_grad and torch.isfinite(loss)
    # The released code detached the loss: its backbone gradient from MSAD was exactly zero.
    assert backbone.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_msad_sums_over_sensor_pairs() -> None:
    torch.manual_seed(0)
    head = MSADHead(16, proj_dim=32).eval()  # no dropout: deterministic
    tokens = {name: torch.randn(3, 5, 16) for name in ("s2", "l8", "ign")}
    expected = sum(reference_pair(head(tokens[a], 0), head(tokens[b], 1))
                   for a, b in (("s2", "l8"), ("s2", "ign"), ("l8", "ign")))
    assert torch.allclose(msad_loss(tokens, head), expected, atol=1e-5)


def test_dense_variant_prefers_matching_positions_and_ignores_invalid_tokens() -> None:
    torch.manual_seed(0)
    emb_a = torch.randn(4, 9, 16)
    matched = msad_pair_dense(emb_a, emb_a + 0.05 * torch.randn(4, 9, 16), tokens_per_tile=0)
    shuffled = msad_pair_dense(emb_a, emb_a[:, torch.randperm(9)], tokens_per_tile=0)
    assert matched < shuffled
    # A cloudy token is neither a positive nor a negative: changing it changes nothing.
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, 4] = False
    emb_b = torch.randn(4, 9, 16)
    altered = emb_b.clone()
    altered[1, 4] = 100.0
    base = msad_pair_dense(emb_a, emb_b, valid, tokens_per_tile=0)
    assert torch.allclose(base, msad_pair_dense(emb_a, altered, valid, tokens_per_tile=0))
    assert torch.isfinite(base)
    # With a subset of positions per tile, only valid ones are drawn while there are enough.
    emb_b.requires_grad_(True)
    msad_pair_dense(emb_a, emb_b, valid, tokens_per_tile=8).backward()
    assert emb_b.grad[1, 4].abs().sum() == 0 and emb_b.grad.abs().sum() > 0


def test_token_grids_of_different_sizes_are_pooled_to_the_coarsest() -> None:
    fine = torch.arange(2 * 17 * 1, dtype=torch.float32).reshape(2, 17, 1)  # CLS + 4x4
    coarse = torch.zeros(2, 5, 1)  # CLS + 2x2
    aligned, flags = align_token_grids({"ign": fine, "l8": coarse},
                                       {"ign": torch.ones(2, 8, 8), "l8": torch.zeros(2, 4, 4)})
    assert aligned["ign"].shape == (2, 5, 1)
    grid = fine[0, 1:, 0].reshape(4, 4)
    assert aligned["ign"][0, 1, 0] == grid[:2, :2].mean() and aligned["ign"][0, 4, 0] == grid[2:, 2:].mean()
    assert aligned["ign"][0, 0, 0] == fine[0, 0, 0]  # CLS kept
    assert flags["ign"][:, 1:].all() and not flags["l8"][:, 1:].any()


def test_msad_total_runs_both_variants_on_mixed_grids() -> None:
    torch.manual_seed(0)
    tokens = {"s2": torch.randn(3, 17, 16, requires_grad=True), "l8": torch.randn(3, 5, 16, requires_grad=True)}
    for variant, head in (("original", MSADHead(16, 32)), ("dense", MSADHead(16, 8))):
        loss = msad_total(tokens, {}, head, variant=variant, tau=0.2, tokens_per_tile=2)
        loss.backward()
        assert torch.isfinite(loss) and tokens["s2"].grad.abs().sum() > 0
