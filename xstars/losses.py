"""Losses of X-STARS: the Multi-Sensor Alignment Dense (MSAD) loss (DINO's loss comes with the model).

MSAD pulls together the patch features of two sensors that see the same ground, token by
token, and pushes apart the features of the other tiles of the batch at the same token
position. ``../shared/reference/xstars-method.md`` describes the released formulation; this
module implements it (``original``) with its defects fixed:

* the loss keeps its graph (the released code rebuilt it with ``torch.tensor(list)``, which
  detached it: MSAD never trained anything);
* the projection and heads are an ``nn.Module`` (:class:`MSADHead`), so they are in the
  optimiser and in checkpoints when the model holds them;
* all token positions and sensor pairs are computed at once (batched matrix products), not in
  a Python loop of 197 small losses.

Shapes: token features are ``[B, T, D]`` (batch, tokens incl. CLS, width); embeddings after the
head are ``[B, T, P]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """``p = Linear(x); h = Dropout(Linear(GELU(p))); out = LayerNorm(h + p)`` (the released head)."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.norm(self.dropout(self.fc(F.gelu(p))) + p)


class MSADHead(nn.Module):
    """Shared projection ``D -> P`` followed by one of two heads: the first sensor of a pair
    goes through ``heads[0]``, the second through ``heads[1]``."""

    def __init__(self, in_dim: int, proj_dim: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.shared = nn.Linear(in_dim, proj_dim)
        self.heads = nn.ModuleList([ProjectionHead(proj_dim, dropout), ProjectionHead(proj_dim, dropout)])

    def forward(self, tokens: torch.Tensor, role: int) -> torch.Tensor:
        return self.heads[role](self.shared(tokens))


def msad_pair_original(emb_a: torch.Tensor, emb_b: torch.Tensor, tau: float = 1.0,
                       label_smoothing: float = 0.3) -> torch.Tensor:
    """The released MSAD loss of one sensor pair, every token position at once.

    For position ``t``: ``logits = E_b E_a^T / tau``, soft targets
    ``softmax((E_a E_a^T + E_b E_b^T) / 2 * tau)``, and the mean of the row-wise and
    column-wise cross-entropies (label smoothing 0.3). Returns the mean over positions.
    ``emb_a``, ``emb_b``: ``[B, T, P]`` embeddings of the same tiles by two sensors.
    """
    a = emb_a.transpose(0, 1)  # [T, B, P]
    b = emb_b.transpose(0, 1)
    logits = b @ a.transpose(1, 2) / tau  # [T, B, B]: logits[t, i, j] = <E_b[i, t], E_a[j, t]>
    similarity = (a @ a.transpose(1, 2) + b @ b.transpose(1, 2)) / 2 * tau
    targets = similarity.softmax(dim=-1)
    n = logits.shape[-1]
    rows = F.cross_entropy(logits.reshape(-1, n), targets.reshape(-1, n), label_smoothing=label_smoothing)
    cols = F.cross_entropy(logits.transpose(1, 2).reshape(-1, n), targets.transpose(1, 2).reshape(-1, n),
                           label_smoothing=label_smoothing)
    return (rows + cols) / 2


def msad_loss(tokens: Mapping[str, torch.Tensor], head: MSADHead, tau: float = 1.0,
              label_smoothing: float = 0.3) -> torch.Tensor:
    """MSAD over every pair of sensors: the sum over pairs of the per-pair loss (mean over positions).

    ``tokens``: sensor -> ``[B, T, D]`` backbone token features of the same tiles, in an order
    that fixes each pair's roles (the first sensor of the pair takes head 0).
    """
    sensors = list(tokens)
    if len(sensors) < 2:
        raise ValueError(f"MSAD needs at least two sensors, got {sensors}")
    total = tokens[sensors[0]].new_zeros(())
    for first, second in itertools.combinations(sensors, 2):
        total = total + msad_pair_original(head(tokens[first], 0), head(tokens[second], 1), tau, label_smoothing)
    return total
