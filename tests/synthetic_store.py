"""A small store in the layout of xstars.store, written directly (no servers): training tests.

Every sample is one smooth random ground field (sinusoids in metres), seen by each sensor on
its own grid: the sensors agree on the ground, so georeferenced crops can be checked and the
cross-sensor losses have something to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xstars.layout import LAYOUT_VERSION

#: Cities of the samples: the first half around the first (site ids are ``<region>_<col>_<row>``,
#: in sample order as in a built store).
REGIONS = ("bordeaux", "toulouse")

#: Sensor -> (gsd_m, bands, stored dtype, scale_factor), as xstars.sensors stores their unit rules.
SENSORS = {"s2": (10.0, ["B02", "B03", "B04", "B08"], "int16", 1e-4),
           "l8": (30.0, ["blue", "green", "red"], "int16", 1e-4),
           "ign": (2.0, ["R", "G", "B", "NIR"], "uint8", 1 / 255)}


def region(sample: int, samples: int) -> str:
    return REGIONS[0] if sample < samples // 2 else REGIONS[1]


def ground_field(x: np.ndarray, y: np.ndarray, sample: int, band: int) -> np.ndarray:
    rng = np.random.default_rng([sample, 7])
    waves = rng.uniform(1 / 400, 1 / 90, size=(3, 2)) * rng.choice([-1, 1], size=(3, 2))
    phases = rng.uniform(0, 2 * np.pi, size=3)
    value = sum(np.sin(2 * np.pi * (x * w[0] + y * w[1]) + p) for w, p in zip(waves, phases, strict=True))
    return 0.3 + 0.08 * value * (1 + 0.2 * band) + 0.02 * band


def write_store(path: Path, samples: int = 12, footprint_m: float = 480.0, samples_per_shard: int = 4,
                splits: tuple[str, ...] | None = None, invalid: dict[int, float] | None = None) -> Path:
    """``invalid``: sample -> fraction of rows marked unusable (top of the tile) in every sensor."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["xstars"] = {"layout_version": LAYOUT_VERSION, "samples": samples,
                            "samples_per_shard": samples_per_shard, "crs": "EPSG:2154", "footprint_m": footprint_m,
                            "sensors": {**{name: {"role": "image", "gsd_m": gsd, "bands": bands}
                                           for name, (gsd, bands, _, _) in SENSORS.items()},
                                        "labels": {"role": "labels", "gsd_m": 10.0, "bands": ["class"]}}}
    splits = splits or tuple("train" if i < samples * 2 // 3 else "test" for i in range(samples))
    origins = [(400000.0 + 1000 * i, 6400000.0 + 500 * (i % 3)) for i in range(samples)]
    for sensor, (gsd, bands, dtype, scale) in SENSORS.items():
        px = int(footprint_m / gsd)
        group = root.create_group(sensor)
        data = group.create_array("data", shape=(samples, len(bands), px, px), dtype=dtype,
                                  chunks=(1, len(bands), px, px), shards=(samples_per_shard, len(bands), px, px),
                                  attributes={"scale_factor": scale, "gsd_m": gsd})
        valid = group.create_array("valid", shape=(samples, px, px), dtype="uint8", chunks=(1, px, px),
                                   shards=(samples_per_shard, px, px))
        transforms = np.zeros((samples, 6))
        values = np.zeros((samples, len(bands), px, px))
        masks = np.ones((samples, px, px), dtype="uint8")
        for i, (x0, y0) in enumerate(origins):
            centres = (np.arange(px) + 0.5) * gsd
            x, y = np.meshgrid(x0 + centres, y0 - centres)
            values[i] = np.stack([ground_field(x, y, i, b) for b in range(len(bands))])
            transforms[i] = (x0, gsd, 0.0, y0, 0.0, -gsd)
            if invalid and i in invalid:
                masks[i, : int(px * invalid[i])] = 0
        data[:] = np.round(values / scale).astype(data.dtype)
        valid[:] = masks
        # As xstars.store records it: the invalid fraction of the footprint, 0 for a clear tile.
        group.create_array("cloud_fraction", shape=(samples,), dtype="float32", chunks=(samples_per_shard,))[:] = (
            1 - masks.mean(axis=(1, 2)))
        group.create_array("band", shape=(len(bands),), dtype=str)[:] = np.array(bands, dtype=object)
        group.create_array("split", shape=(samples,), dtype=str)[:] = np.array(splits, dtype=object)
        group.create_array("status", shape=(samples,), dtype=str)[:] = np.array(["ok"] * samples, dtype=object)
        group.create_array("site_id", shape=(samples,), dtype=str)[:] = np.array(
            [f"{region(i, samples)}_{i:03d}_0" for i in range(samples)], dtype=object)
        group.create_array("region", shape=(samples,), dtype=str)[:] = np.array(
            [region(i, samples) for i in range(samples)], dtype=object)
        group.create_array("transform", shape=(samples, 6), dtype="float64")[:] = transforms
        train = [i for i, s in enumerate(splits) if s == "train"]
        physical = values[train].transpose(1, 0, 2, 3).reshape(len(bands), -1)
        group.attrs["normalization"] = {"split": "train", "mean": physical.mean(axis=1).round(6).tolist(),
                                        "std": physical.std(axis=1).round(6).tolist()}
    write_labels(root, origins, footprint_m, samples, samples_per_shard, splits)
    return path


#: WorldCover classes given to ranges of the ground field (so every sensor sees the classes).
LABEL_CLASSES = ((0.22, 80), (0.30, 10), (0.38, 30), (9.0, 50))


def write_labels(root, origins, footprint_m: float, samples: int, samples_per_shard: int, splits) -> None:
    px = int(footprint_m / 10)
    group = root.create_group("labels")
    maps = np.zeros((samples, 1, px, px), dtype="uint8")
    for i, (x0, y0) in enumerate(origins):
        centres = (np.arange(px) + 0.5) * 10
        field = ground_field(*np.meshgrid(x0 + centres, y0 - centres), i, 0)
        for upper, code in reversed(LABEL_CLASSES):
            maps[i, 0][field < upper] = code
    group.create_array("data", shape=maps.shape, dtype="uint8", chunks=(1, 1, px, px),
                       shards=(samples_per_shard, 1, px, px),
                       attributes={"gsd_m": 10.0, "flag_values": sorted(code for _, code in LABEL_CLASSES)})[:] = maps
    group.create_array("valid", shape=(samples, px, px), dtype="uint8", chunks=(1, px, px),
                       shards=(samples_per_shard, px, px))[:] = 1
    group.create_array("band", shape=(1,), dtype=str)[:] = np.array(["class"], dtype=object)
    group.create_array("split", shape=(samples,), dtype=str)[:] = np.array(splits, dtype=object)
    group.create_array("status", shape=(samples,), dtype=str)[:] = np.array(["ok"] * samples, dtype=object)
