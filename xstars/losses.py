"""Losses of X-STARS: DINO's self-distillation loss and the Multi-Sensor Alignment Dense (MSAD) loss.

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

A ``dense`` variant (:func:`msad_pair_dense`) is the contrastive form the method calls for:
L2-normalised embeddings, a temperature, and as negatives every other position of every tile
of the batch (optionally of every GPU), on a random subset of positions per tile.

Sensors seen at different input sizes have token grids of different sizes over the same ground
box; :func:`align_token_grids` averages the finer grids down to the coarsest before either
variant compares them position by position.

Shapes: token features are ``[B, T, D]`` (batch, tokens incl. CLS, width); embeddings after the
head are ``[B, T, P]``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping

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


def msad_pair_dense(emb_a: torch.Tensor, emb_b: torch.Tensor, valid: torch.Tensor | None = None,
                    tau: float = 0.1, tokens_per_tile: int = 49, gather: bool = False) -> torch.Tensor:
    """Dense contrastive MSAD of one sensor pair (InfoNCE, both directions).

    Token ``t`` of tile ``i`` by sensor A must find token ``t`` of tile ``i`` by sensor B among
    every selected token of every tile (of every GPU when ``gather``). ``tokens_per_tile``
    positions are drawn at random per tile among the valid ones (``valid``: ``[B, T]`` bool;
    cloudy or no-data tokens are never positives); 0 keeps all. Embeddings are L2-normalised.
    """
    b, t, _ = emb_a.shape
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=emb_a.device)
    index = draw_positions(valid, tokens_per_tile)  # [B, K]
    keep = index.shape[1]
    chosen_valid = valid.gather(1, index).reshape(-1)
    za = F.normalize(take_positions(emb_a, index).reshape(b * keep, -1), dim=-1)
    zb = F.normalize(take_positions(emb_b, index).reshape(b * keep, -1), dim=-1)
    offset = 0
    za_all, zb_all, valid_all = za, zb, chosen_valid
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        import torch.distributed.nn.functional as dist_fn

        rank = torch.distributed.get_rank()
        za_all = torch.cat(dist_fn.all_gather(za))  # differentiable: gradients reach every rank
        zb_all = torch.cat(dist_fn.all_gather(zb))
        flags = [torch.zeros_like(chosen_valid) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(flags, chosen_valid)
        valid_all = torch.cat(flags)
        offset = rank * za.shape[0]
    labels = torch.arange(za.shape[0], device=za.device) + offset
    # An invalid token is no candidate (and, by its zero weight below, no anchor); its own
    # column stays so that its row is finite.
    exclude = (~valid_all)[None, :].expand(za.shape[0], -1).clone()
    exclude[torch.arange(za.shape[0], device=za.device), labels] = False
    logits_ab = (za.float() @ zb_all.float().T / tau).masked_fill(exclude, float("-inf"))
    logits_ba = (zb.float() @ za_all.float().T / tau).masked_fill(exclude, float("-inf"))
    per_token = (F.cross_entropy(logits_ab, labels, reduction="none")
                 + F.cross_entropy(logits_ba, labels, reduction="none")) / 2
    weight = chosen_valid.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def draw_positions(valid: torch.Tensor, tokens_per_tile: int) -> torch.Tensor:
    """``tokens_per_tile`` random positions per tile (``[B, K]``), valid ones first; 0 = all."""
    b, t = valid.shape
    if tokens_per_tile <= 0 or tokens_per_tile >= t:
        return torch.arange(t, device=valid.device).expand(b, t)
    # A random score, pushed above every invalid position's when valid.
    score = torch.rand(b, t, device=valid.device) + valid.float() * 2
    return score.topk(tokens_per_tile, dim=1).indices


def take_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[i, index[i]]`` for ``x`` of shape ``[B, T, D]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def align_token_grids(tokens: Mapping[str, torch.Tensor], valid: Mapping[str, torch.Tensor] | None = None,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bring every sensor's tokens to the coarsest token grid among them.

    ``tokens``: sensor -> ``[B, 1 + h*w, D]`` (CLS first, square grids over the same ground
    box). Finer grids are average-pooled (adaptive pooling, exact when the sizes divide).
    ``valid``: sensor -> ``[B, H, W]`` fraction of usable pixels of the sensor's view; returned
    as ``[B, 1 + h*w]`` booleans (a token is valid when at least half its ground is usable).
    """
    sides = {s: math.isqrt(x.shape[1] - 1) for s, x in tokens.items()}
    for sensor, side in sides.items():
        if side * side != tokens[sensor].shape[1] - 1:
            raise ValueError(f"{sensor}: {tokens[sensor].shape[1] - 1} patch tokens are not a square grid")
    side = min(sides.values())
    aligned, flags = {}, {}
    for sensor, x in tokens.items():
        b, _, d = x.shape
        grid = x[:, 1:]
        if sides[sensor] != side:
            grid = x[:, 1:].transpose(1, 2).reshape(b, d, sides[sensor], sides[sensor])
            grid = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        aligned[sensor] = torch.cat([x[:, :1], grid], dim=1)
        if valid is not None and sensor in valid:
            fraction = F.adaptive_avg_pool2d(valid[sensor][:, None].float(), side).flatten(1)
            flags[sensor] = torch.cat([fraction.new_ones(b, 1), fraction], dim=1) >= 0.5
    return aligned, flags


def msad_total(tokens: Mapping[str, torch.Tensor], valid: Mapping[str, torch.Tensor], head: MSADHead, *,
               variant: str, tau: float, label_smoothing: float = 0.3, tokens_per_tile: int = 49,
               gather: bool = False) -> torch.Tensor:
    """MSAD summed over sensor pairs, after aligning token grids (the loss the model calls)."""
    aligned, flags = align_token_grids(tokens, valid)
    if variant == "original":
        return msad_loss(aligned, head, tau, label_smoothing)
    if variant != "dense":
        raise ValueError(f"unknown MSAD variant {variant!r} (original or dense)")
    total = next(iter(aligned.values())).new_zeros(())
    for first, second in itertools.combinations(list(aligned), 2):
        a, b = aligned[first][:, 1:], aligned[second][:, 1:]  # patch tokens only: CLS is not a place
        both = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        if first in flags and second in flags:
            both = (flags[first] & flags[second])[:, 1:]
        # Draw the positions first and project only those: the heads are most of the cost.
        index = draw_positions(both, tokens_per_tile)
        total = total + msad_pair_dense(head(take_positions(a, index), 0), head(take_positions(b, index), 1),
                                        both.gather(1, index), tau, 0, gather)
    return total


def make_msad_loss(msad: Mapping) -> Callable | None:
    """The MSAD loss function configured by ``pretrain.msad`` (None when ``alpha`` is 0)."""
    if msad["alpha"] == 0:
        return None
    variant = msad["variant"]
    settings = msad[variant]
    if variant == "original":
        return functools.partial(msad_total, variant="original", tau=settings["tau"],
                                 label_smoothing=settings["label_smoothing"])
    return functools.partial(msad_total, variant="dense", tau=settings["tau"],
                             tokens_per_tile=settings["tokens_per_tile"], gather=settings["gather"])


class DINOLoss(nn.Module):
    """DINO's loss: cross-entropy between the centred, sharpened teacher outputs of the global
    crops and the student outputs of every other crop; the centre is an EMA of the teacher's
    batch mean (averaged over GPUs)."""

    def __init__(self, out_dim: int, n_crops: int, teacher_temp: float, warmup_teacher_temp: float,
                 warmup_teacher_temp_epochs: int, epochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_crops = n_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = min(warmup_teacher_temp_epochs, epochs)
        self.teacher_temps = [warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * i / max(warm, 1)
                              for i in range(warm)] + [teacher_temp] * (epochs - warm)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student = (student_output.float() / self.student_temp).chunk(self.n_crops)
        temp = self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]
        teacher = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = student_output.new_zeros((), dtype=torch.float32), 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue  # a crop does not predict itself
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor([teacher_output.shape[0]], dtype=torch.float32, device=teacher_output.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            torch.distributed.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
