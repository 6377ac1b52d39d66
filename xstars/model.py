"""Model: a Vision Transformer with one patch embedding per sensor, DINO's head, and MSAD's head.

The transformer is shared by every sensor; only the patch embedding (a 16x16 convolution over
the sensor's own bands) is per sensor. Parameter names follow timm's and DINO's ViT
(``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, ...), with the patch embedding keyed by
sensor (``patch_embed.s2.proj.weight``), so weights move between the three layouts by renaming
one prefix (:func:`convert_state_dict`).

:class:`XStars` is the student: backbone + DINO head + MSAD head in one ``nn.Module``, whose
``forward`` computes both the DINO outputs and the MSAD loss. Wrapped in DDP, every parameter
(MSAD's heads included) is then used inside the wrapped forward, so gradients are synchronised;
the released code called the inner module for MSAD, bypassing the wrapper.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xstars.errors import ConfigError, DataError

# name -> (embed_dim, depth, heads), as in DeiT / DINO.
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


# ===================================================================================== ViT


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # fused kernel where the device has one
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """A sensor's bands -> one token per ``patch_size`` square."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class ViT(nn.Module):
    """Shared transformer with one patch embedding per sensor.

    ``sensor_bands``: sensor -> number of input bands. ``forward(x, sensor)`` returns every
    token after the final norm, ``[B, 1 + (H/p)(W/p), D]`` (CLS first). The position embedding
    is learnt for ``img_size`` and interpolated for other sizes (DINO's local crops).
    """

    def __init__(self, sensor_bands: Mapping[str, int], arch: str = "vit_small", patch_size: int = 16,
                 img_size: int = 224, drop_path: float = 0.0) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ConfigError(f"pretrain.model.arch: {arch!r} is not one of {sorted(ARCHITECTURES)}")
        dim, depth, heads = ARCHITECTURES[arch]
        self.arch, self.embed_dim, self.patch_size, self.img_size = arch, dim, patch_size, img_size
        self.sensor_bands = dict(sensor_bands)
        self.patch_embed = nn.ModuleDict({s: PatchEmbed(c, dim, patch_size) for s, c in sensor_bands.items()})
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linearly increasing, as DINO
        self.blocks = nn.ModuleList([Block(dim, heads, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        return resize_pos_embed(self.pos_embed, grid_h, grid_w)

    def forward(self, x: torch.Tensor, sensor: str) -> torch.Tensor:
        if sensor not in self.patch_embed:
            raise DataError(f"the model has no patch embedding for sensor {sensor!r} (has {sorted(self.patch_embed)})")
        b, _, h, w = x.shape
        tokens = self.patch_embed[sensor](x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """A ``[1, 1 + n*n, D]`` position embedding resized (bicubic) to a ``grid_h x grid_w`` grid."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise DataError(f"position embedding of {n} patches is not a square grid")
    if grid_h == side and grid_w == side:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ============================================================================== DINO head


class DINOHead(nn.Module):
    """DINO's projection head: 3-layer MLP -> L2-normalised bottleneck -> weight-normalised
    linear layer of ``out_dim`` prototypes (its norm fixed to 1 when ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(_init_weights)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


# ================================================================================ student


@dataclass
class StudentOutput:
    dino: torch.Tensor  # [n_crops * B, out_dim], crops in the order given
    msad: torch.Tensor  # scalar MSAD loss (0 when alpha is 0 or no pair exists)


class XStars(nn.Module):
    """Student of X-STARS: backbone, DINO head and MSAD head, run together in ``forward``.

    ``msad_loss_fn(tokens, valid, head)`` computes the MSAD loss from per-sensor token features
    (see :mod:`xstars.losses`); it is called inside ``forward`` so that DDP sees every use of
    every parameter.
    """

    def __init__(self, backbone: ViT, dino_head: DINOHead, msad_head: nn.Module, msad_loss_fn) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.msad_head = msad_head
        self.msad_loss_fn = msad_loss_fn

    def forward(self, sensor: str, crops: Sequence[torch.Tensor], paired: Mapping[str, torch.Tensor] | None = None,
                paired_valid: Mapping[str, torch.Tensor] | None = None,
                frozen_tokens: Mapping[str, torch.Tensor] | None = None) -> StudentOutput:
        """DINO on ``crops`` of ``sensor``, MSAD between ``crops[0]`` and the ``paired`` views.

        ``paired``: other sensors' views of the ground box of ``crops[0]`` (through this
        backbone). ``frozen_tokens``: token features of other sensors computed by a frozen
        model (continual pretraining), used as they are.
        """
        features, first_tokens = [], None
        # Crops of one size go through the backbone together (DINO's multi-crop wrapper).
        for size, group in _groups_by_size(crops):
            tokens = self.backbone(torch.cat(group), sensor)
            if first_tokens is None:
                first_tokens = tokens[: crops[0].shape[0]]
            features.append(tokens[:, 0])
        dino = self.dino_head(torch.cat(features))
        tokens = {sensor: first_tokens}
        valid = {sensor: paired_valid[sensor]} if paired_valid and sensor in paired_valid else {}
        for other, view in (paired or {}).items():
            tokens[other] = self.backbone(view, other)
            if paired_valid and other in paired_valid:
                valid[other] = paired_valid[other]
        for other, frozen in (frozen_tokens or {}).items():
            tokens[other] = frozen
            if paired_valid and other in paired_valid:
                valid[other] = paired_valid[other]
        if len(tokens) < 2 or self.msad_loss_fn is None:
            msad = dino.new_zeros(())
        else:
            msad = self.msad_loss_fn(tokens, valid, self.msad_head)
        return StudentOutput(dino=dino, msad=msad)


class Teacher(nn.Module):
    """DINO's EMA teacher: backbone + head, no gradient, CLS outputs of the global crops."""

    def __init__(self, student: XStars) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.dino_head = copy.deepcopy(student.dino_head)
        for p in self.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def forward(self, sensor: str, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.dino_head(self.backbone(torch.cat(list(crops)), sensor)[:, 0])


def _groups_by_size(crops: Sequence[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
    """Consecutive crops of the same size, in order (global crops, then local crops)."""
    groups: list[tuple[int, list[torch.Tensor]]] = []
    for crop in crops:
        if groups and groups[-1][0] == crop.shape[-1]:
            groups[-1][1].append(crop)
        else:
            groups.append((crop.shape[-1], [crop]))
    return groups


@torch.no_grad()
def ema_update(teacher: Teacher, student: XStars, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    for name in ("backbone", "dino_head"):
        t_params = list(getattr(teacher, name).parameters())
        s_params = list(getattr(student, name).parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)


# ============================================================================ weight I/O


WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "backbone")
IGNORED_PREFIXES = ("head.", "fc_norm.", "decoder", "mask_token", "dino_head.", "msad_head.")


def convert_state_dict(state: Mapping[str, Any], sensor: str, layout: str = "auto") -> tuple[dict, str]:
    """A ViT state dict in our, timm's or DINO's layout -> our backbone's keys.

    * ``xstars``: a checkpoint of ours (``{"student": {...}}`` or a bare backbone state dict);
    * ``timm`` / ``dino``: one ``patch_embed.proj`` for ``sensor``; wrapper keys (``model``,
      ``teacher``, ``state_dict``) and prefixes (``module.``, ``backbone.``) are removed, and
      heads (classifier, DINO head, MAE decoder) are dropped: they are not the backbone.

    Returns the converted dict and the layout detected.
    """
    for key in WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            if key == "student" and "teacher" in state:
                continue  # a DINO checkpoint: its teacher is the model it reports
            state = state[key]
            break
    keys = list(state)
    for prefix in ("module.", "backbone."):
        if keys and all(k.startswith(prefix) for k in keys if not k.startswith(("head.", "dino_head.", "msad_head."))):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            keys = list(state)
    if layout == "auto":
        layout = "xstars" if any(k.startswith("patch_embed.") and not k.startswith("patch_embed.proj.")
                                 for k in keys) else "timm"
    out = {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        if layout != "xstars" and key.startswith("patch_embed.proj."):
            key = f"patch_embed.{sensor}.proj." + key.removeprefix("patch_embed.proj.")
        out[key] = value
    return out, layout


def load_backbone(backbone: ViT, state: Mapping[str, torch.Tensor], new_sensors: Sequence[str] = (),
                  source: str = "checkpoint") -> None:
    """Load ``state`` into ``backbone`` with strict key matching.

    The only keys allowed to be missing are the patch embeddings of ``new_sensors`` (sensors
    the checkpoint never saw: continual pretraining). Anything else missing or unexpected, or a
    shape that differs, raises :class:`DataError` listing every offending key.
    """
    own = backbone.state_dict()
    state = dict(state)
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = math.isqrt(own["pos_embed"].shape[1] - 1)
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, grid)
    allowed_missing = {k for k in own if any(k.startswith(f"patch_embed.{s}.") for s in new_sensors)}
    missing = sorted(set(own) - set(state) - allowed_missing)
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(f"{k}: {tuple(state[k].shape)} in {source}, {tuple(own[k].shape)} in the model"
                         for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        lines = [f"{source} does not match the backbone ({backbone.arch}, sensors {sorted(backbone.sensor_bands)}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong_shape:
            lines.append(f"  shapes differ ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
        raise DataError("\n".join(lines))
    result = backbone.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == sorted(allowed_missing & set(result.missing_keys))


# ==================================================================== exported backbones

#: What a finished run exports: the teacher's backbone and how to feed it.
BACKBONE = "backbone.safetensors"
BACKBONE_JSON = "backbone.json"


def read_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (always ``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def export_backbone(backbone: ViT, infos: Mapping[str, Any], settings: Mapping[str, Any], out_dir: Path,
                    summary: Mapping[str, Any]) -> Path:
    """The backbone as safetensors, with a JSON that says how to feed it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(out_dir / BACKBONE))
    description = {
        "format": "xstars-backbone-1",
        "architecture": {"arch": backbone.arch, "embed_dim": backbone.embed_dim, "patch_size": backbone.patch_size,
                         "img_size": backbone.img_size, "depth": len(backbone.blocks),
                         "heads": backbone.blocks[0].attn.heads},
        "sensors": {s: {"bands": list(i.bands), "mean": [float(m) for m in i.mean], "std": [float(x) for x in i.std],
                        "scale_factor": i.scale,
                        "note": "x = (stored value * scale_factor - mean) / std, invalid pixels set to 0"}
                    for s, i in infos.items()},
        "weights": "teacher (EMA) backbone, keys in xstars layout (patch_embed.<sensor>.proj.*)",
        "training": {**summary, "mode": settings["mode"], "msad": settings["msad"]},
    }
    (out_dir / BACKBONE_JSON).write_text(json.dumps(description, indent=2) + "\n")
    return out_dir / BACKBONE


def load_exported(path: Path | str) -> tuple[ViT, dict[str, Any]]:
    """An exported backbone (``backbone.safetensors`` beside its ``backbone.json``), strict."""
    path = Path(path)
    description = json.loads(path.with_suffix(".json").read_text())
    arch = description["architecture"]
    backbone = ViT({s: len(d["bands"]) for s, d in description["sensors"].items()}, arch=arch["arch"],
                   patch_size=arch["patch_size"], img_size=arch["img_size"])
    load_backbone(backbone, read_weights(path), source=str(path))
    return backbone.eval(), description
