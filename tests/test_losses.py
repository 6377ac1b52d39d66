"""MSAD: the released formulation with its defects fixed, checked against a per-position loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xstars.losses import MSADHead, msad_loss, msad_pair_original


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
