"""A map-style ``torch.utils.data.Dataset`` over the store, for users who bring their own loop.

::

    from torch.utils.data import DataLoader
    from xstars.torch_dataset import StoreDataset

    dataset = StoreDataset("results/dataset/dataset.zarr", sensors=["s2", "labels"], splits=["train"])
    batch = next(iter(DataLoader(dataset, batch_size=8, shuffle=True, num_workers=4)))

A sample is one site as every requested sensor sees it, in torchgeo's convention: per sensor a
dict with ``image`` (float32 [bands, H, W] in physical units: reflectance, DN / 255) for an
imaging sensor or ``mask`` (int64 [H, W] class codes: torchgeo's segmentation target) for the
label sensor, plus ``valid`` (bool [H, W], False under clouds, shadows and no data), ``crs``
(the store's CRS as a string) and ``bounds`` (float64 [4]: xmin, ymin, xmax, ymax in that CRS);
and the sample's ``index``, ``site_id``, ``region`` and ``split``. The default collate stacks
all of it (strings become lists).

The store is opened lazily in each process that reads from it: a DataLoader worker, whether
forked or spawned, opens its own handles on its first sample rather than inheriting the
parent's (zarr's handles hold an event loop that does not survive a fork).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xstars.errors import DataError
from xstars.layout import IMAGE, LABELS, open_store, store_sensors


class StoreDataset(Dataset):
    """Sites of an xstars store, every requested sensor's tile of each.

    Args:
        path: the Zarr store (``<results>/dataset/dataset.zarr`` or an imported one).
        sensors: groups to read (default: every sensor of the store).
        splits: keep the samples of these splits (default: every split).
        transforms: called on each sample dict, returns the sample to give (augmentation,
            normalisation: :meth:`normalization` gives the store's per-band statistics).
        only_usable: keep only the samples whose status is ``ok`` for every requested sensor
            (dropped sites have no pixel).
    """

    def __init__(self, path: Path | str, sensors: Sequence[str] | None = None, splits: Sequence[str] | None = None,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 only_usable: bool = True) -> None:
        self.path = str(path)
        root = open_store(self.path)
        known = store_sensors(root)
        self.sensors = list(sensors) if sensors is not None else list(known)
        unknown = [s for s in self.sensors if s not in known]
        if unknown or not self.sensors:
            raise DataError(f"{self.path}: sensors {unknown or self.sensors} requested, the store has {list(known)}")
        self.roles = {s: known[s]["role"] for s in self.sensors}
        self.crs = str(root.attrs["xstars"].get("crs", ""))
        # Per-sample identity from an imaging group (every group holds the same samples).
        meta = root[next((s for s, e in known.items() if e["role"] == IMAGE), self.sensors[0])]
        self.site_ids, self.regions, self.splits = (meta[k][:] if k in meta else np.array([""] * meta["status"].shape[0])
                                                    for k in ("site_id", "region", "split"))
        keep = np.ones(len(self.site_ids), dtype=bool)
        if splits is not None:
            keep &= np.isin(self.splits, list(splits))
        if only_usable:
            for sensor in self.sensors:
                keep &= root[sensor]["status"][:] == "ok"
        self.indices = np.nonzero(keep)[0]
        self._transforms_array = {s: root[s]["transform"][:] for s in self.sensors}
        self._decode = {s: (float(root[s]["data"].attrs.get("scale_factor", 1.0)),
                            float(root[s]["data"].attrs.get("add_offset", 0.0))) for s in self.sensors}
        self._tile_px = {s: int(root[s]["data"].shape[-1]) for s in self.sensors}
        self.bands = {s: [str(b) for b in root[s]["band"][:]] for s in self.sensors}
        self._statistics = {s: root[s].attrs.get("normalization") for s in self.sensors}
        self.transforms = transforms
        self._root = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of a dataset of {len(self)}")
        i = int(self.indices[index])
        root = self._open()
        sample: dict[str, Any] = {"index": i, "site_id": str(self.site_ids[i]), "region": str(self.regions[i]),
                                  "split": str(self.splits[i])}
        for sensor in self.sensors:
            group = root[sensor]
            data, valid = group["data"][i], group["valid"][i]
            x0, dx, _, y0, _, dy = (float(v) for v in self._transforms_array[sensor][i])
            px = self._tile_px[sensor]
            entry: dict[str, Any] = {"valid": torch.from_numpy(valid.astype(bool)), "crs": self.crs,
                                     "bounds": torch.tensor([x0, y0 + dy * px, x0 + dx * px, y0], dtype=torch.float64)}
            if self.roles[sensor] == LABELS:
                entry["mask"] = torch.from_numpy(data[0].astype(np.int64))
            else:
                scale, offset = self._decode[sensor]
                entry["image"] = torch.from_numpy(data.astype(np.float32) * np.float32(scale) + np.float32(offset))
            sample[sensor] = entry
        return self.transforms(sample) if self.transforms is not None else sample

    def normalization(self, sensor: str) -> Mapping[str, Any] | None:
        """The store's per-band statistics of ``sensor`` (training split, physical units):
        ``{"mean": [...], "std": [...], ...}``, or None when the store has none."""
        return self._statistics[sensor]

    def _open(self):
        """The store's root, opened once per process (a forked worker opens its own)."""
        if self._root is None or self._pid != os.getpid():
            self._root, self._pid = open_store(self.path), os.getpid()
        return self._root

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_root": None, "_pid": None}  # a spawned worker opens its own
