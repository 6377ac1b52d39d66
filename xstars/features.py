"""Frozen features: the tiles of a store embedded by a backbone, one sensor at a time.

How a model reads each sensor of a store (:func:`model_infos`: its bands and normalisation,
located in the store), the whole footprint of every tile resampled to the model's input size
(:func:`footprint_views`), and the CLS and patch tokens of the frozen backbone (:func:`embed`,
:class:`Embedded`). The store's downstream tasks (:mod:`xstars.evaluate`) and the public
benchmarks (:mod:`xstars.benchmarks`, through :func:`embed_views`) probe these features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xstars.data import SensorInfo, StoreReader, footprint_box, resample_box, sensor_infos
from xstars.errors import DataError
from xstars.model import ViT


@dataclass
class Embedded:
    """Frozen features of some tiles by one sensor."""

    cls: torch.Tensor  # [n, D]
    patches: torch.Tensor  # [n, h, w, D]

    def tile_features(self, kind: str = "cls_mean") -> torch.Tensor:
        """One vector per tile: CLS, mean of patch tokens, or both (each L2-normalised)."""
        mean = self.patches.flatten(1, 2).mean(dim=1)
        parts = {"cls": [self.cls], "mean": [mean], "cls_mean": [self.cls, mean]}[kind]
        return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


def model_infos(store: Path | str, description: Mapping[str, Any], sensors: Sequence[str]) -> dict[str, SensorInfo]:
    """How the model reads each sensor (its bands and normalisation), located in the store."""
    infos = {}
    for sensor in sensors:
        if sensor not in description["sensors"]:
            raise DataError(f"the model was not trained on {sensor!r} (it knows {sorted(description['sensors'])})")
        wanted = description["sensors"][sensor]
        store_info = sensor_infos(store, [sensor], {sensor: wanted["bands"]})[sensor]
        infos[sensor] = SensorInfo(sensor, tuple(wanted["bands"]), store_info.band_index,
                                   np.asarray(wanted["mean"], dtype=np.float32),
                                   np.asarray(wanted["std"], dtype=np.float32), store_info.scale, store_info.tile_px)
    return infos


def footprint_views(store: Path | str, infos: Mapping[str, SensorInfo], samples: Sequence[int],
                    px: int) -> dict[str, torch.Tensor]:
    """Whole footprints of ``samples`` as ``px``-pixel normalised views, per sensor ``[n, C, px, px]``."""
    reader = StoreReader(store, infos)
    per_shard = reader.samples_per_shard
    views: dict[str, list[torch.Tensor]] = {s: [] for s in infos}
    by_shard: dict[int, list[int]] = {}
    for i in samples:
        by_shard.setdefault(int(i) // per_shard, []).append(int(i))
    for chunk in by_shard.values():  # one read per shard
        tiles = reader.read(min(chunk), max(chunk) + 1)
        for i in chunk:
            for sensor, (image, _, transform) in tiles[i].items():
                views[sensor].append(resample_box(image, transform, footprint_box(transform, image.shape[-1]), px))
    return {sensor: torch.stack(images) for sensor, images in views.items()}


@torch.no_grad()
def embed_views(backbone: ViT, images: torch.Tensor, sensor: str, batch_size: int = 64,
                device: torch.device | None = None) -> Embedded:
    device = device or next(backbone.parameters()).device
    grid = images.shape[-1] // backbone.patch_size
    cls, patches = [], []
    for start in range(0, len(images), batch_size):
        tokens = backbone(images[start:start + batch_size].to(device), sensor).float().cpu()
        cls.append(tokens[:, 0])
        patches.append(tokens[:, 1:].reshape(-1, grid, grid, tokens.shape[-1]))
    return Embedded(torch.cat(cls), torch.cat(patches))


def embed(backbone: ViT, store: Path | str, infos: Mapping[str, SensorInfo], samples: Sequence[int], px: int,
          batch_size: int = 64, device: torch.device | None = None) -> dict[str, Embedded]:
    """Features of ``samples`` by every sensor of ``infos`` (whole footprints at ``px`` pixels)."""
    views = footprint_views(store, infos, samples, px)
    return {sensor: embed_views(backbone, images, sensor, batch_size, device) for sensor, images in views.items()}
