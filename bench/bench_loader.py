"""Loader throughput: the Zarr store read by xstars' loader, against the released data layout.

The released code reads one PNG per sensor per tile from image folders (PIL), in random order.
The same tiles (3 sensors x 224 x 224 RGB, uint8, smooth fields + noise so that PNG and zstd
compress as on real images) are written both ways; then, on 2 CPU cores:

* ``png_folder``: PIL open + decode of the 3 PNGs of each tile, tiles in random order, then
  ToTensor + Normalize (float32), as the released loader does;
* ``zarr_per_sample``: zarr-python reading one sample at a time in random order (the naive way);
* ``png_decode``: the PNGs decoded only (no float conversion), for
* ``xstars_read_raw``: :meth:`xstars.data.StoreReader.read_raw`, whole shards as stored (what a
  loader stream keeps in its shuffle buffer), masks included;
* ``xstars_reader``: :class:`xstars.data.StoreReader` reading whole shards in a random shard
  order (what every loader stream does), normalised float32 out, with the validity masks
  (a cloud on 30 % of the Sentinel-2 and Landsat tiles, orthophotos clear: the PNG layout
  has no masks at all);
* ``xstars_batches``: the full :class:`xstars.data.PretrainBatches` pipeline (reads + DINO
  multi-crop + paired georeferenced views), for the cost of the augmentations.

    python bench/bench_loader.py [--samples 256] [--shard 64] [--repeats 5] [--workdir /tmp/xstars-bench-loader]

Prints one JSON line per method, with samples/s and the ratio to ``png_folder`` (``png_decode``
for ``xstars_read_raw``: raw against raw).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

SENSORS = ("s2", "l8", "ign")


def tiles(n: int, px: int = 224) -> np.ndarray:
    """[n, sensor, 3, px, px] uint8: per tile a smooth field (shared by sensors) plus sensor noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:px, 0:px] / px
    out = np.empty((n, len(SENSORS), 3, px, px), dtype=np.uint8)
    for i in range(n):
        f = rng.uniform(2, 12, size=(3, 2))
        field = sum(np.sin(2 * np.pi * (x * a + y * b) + rng.uniform(0, 6)) for a, b in f) / 3
        for s in range(len(SENSORS)):
            for c in range(3):
                value = 110 + 60 * field * (1 + 0.2 * c) + rng.normal(0, 4 + 3 * s, size=(px, px))
                out[i, s, c] = np.clip(value, 0, 255)
    return out


def cloud_masks(n: int, px: int, seed: int, cloudy: float = 0.3) -> np.ndarray:
    """Validity masks with a cloud (a disc of 5-25 % of the tile) on ``cloudy`` of the tiles, as on
    Sentinel-2 / Landsat tiles kept under ``catalog.max_invalid_fraction``; orthophotos are clear."""
    rng = np.random.default_rng(100 + seed)
    y, x = np.mgrid[0:px, 0:px]
    masks = np.ones((n, px, px), dtype=np.uint8)
    for i in np.nonzero(rng.random(n) < cloudy)[0]:
        cy, cx = rng.uniform(0, px, size=2)
        radius = px * np.sqrt(rng.uniform(0.05, 0.25) / np.pi)
        masks[i][(y - cy) ** 2 + (x - cx) ** 2 < radius**2] = 0
    return masks


def write_png_folder(data: np.ndarray, root: Path) -> None:
    from PIL import Image

    for s, sensor in enumerate(SENSORS):
        (root / sensor / "tiles").mkdir(parents=True, exist_ok=True)
        for i in range(len(data)):
            Image.fromarray(data[i, s].transpose(1, 2, 0)).save(root / sensor / "tiles" / f"{i:06d}.png")


def write_store(data: np.ndarray, path: Path, shard: int) -> None:
    """The layout of xstars.store (one inner chunk per sample, ``shard`` samples per shard)."""
    import zarr

    n, _, c, px, _ = data.shape
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    from xstars.layout import LAYOUT_VERSION

    root.attrs["xstars"] = {"layout_version": LAYOUT_VERSION, "samples": n, "samples_per_shard": shard}
    for s, sensor in enumerate(SENSORS):
        group = root.create_group(sensor)
        array = group.create_array("data", shape=(n, c, px, px), dtype="uint8", chunks=(1, c, px, px),
                                   shards=(shard, c, px, px), attributes={"scale_factor": 1 / 255})
        array[:] = data[:, s]
        valid = cloud_masks(n, px, seed=s) if sensor != "ign" else np.ones((n, px, px), dtype=np.uint8)
        group.create_array("valid", shape=(n, px, px), dtype="uint8", chunks=(1, px, px), shards=(shard, px, px))[:] = valid
        group.create_array("cloud_fraction", shape=(n,), dtype="float32", chunks=(shard,))[:] = 1 - valid.mean(axis=(1, 2))
        group.create_array("band", shape=(3,), dtype=str)[:] = np.array(["R", "G", "B"], dtype=object)
        group.create_array("split", shape=(n,), dtype=str)[:] = np.array(["train"] * n, dtype=object)
        group.create_array("status", shape=(n,), dtype=str)[:] = np.array(["ok"] * n, dtype=object)
        group.create_array("transform", shape=(n, 6), dtype="float64")[:] = np.array(
            [(400000.0 + 3000 * i, 10.0, 0.0, 6400000.0, 0.0, -10.0) for i in range(n)])
        group.attrs["normalization"] = {"split": "train", "mean": [0.45] * 3, "std": [0.2] * 3}


def rate(fn, samples: int, repeats: int) -> float:
    """Samples per second of ``fn``, median of ``repeats`` passes (the OS file cache is warm for all)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return samples / float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--shard", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/xstars-bench-loader"))
    args = parser.parse_args()
    import torch
    from PIL import Image

    from xstars.data import BatchPlan, PretrainBatches, StoreReader, ViewSpec, sensor_infos

    shutil.rmtree(args.workdir, ignore_errors=True)
    data = tiles(args.samples)
    write_png_folder(data, args.workdir / "png")
    store = args.workdir / "dataset.zarr"
    write_store(data, store, args.shard)
    order = np.random.default_rng(1).permutation(args.samples)

    def png_folder() -> None:
        for i in order:
            for sensor in SENSORS:
                with Image.open(args.workdir / "png" / sensor / "tiles" / f"{i:06d}.png") as image:
                    pixels = np.asarray(image.convert("RGB"))
                # ToTensor + Normalize, as the released loader does (the xstars reader normalises too).
                torch.from_numpy((pixels.transpose(2, 0, 1).astype(np.float32) / 255 - 0.45) / 0.2)

    def png_decode() -> None:
        for i in order:
            for sensor in SENSORS:
                with Image.open(args.workdir / "png" / sensor / "tiles" / f"{i:06d}.png") as image:
                    np.asarray(image.convert("RGB"))

    def zarr_per_sample() -> None:
        import zarr

        root = zarr.open_group(str(store), mode="r")
        for i in order:
            for sensor in SENSORS:
                root[sensor]["data"][int(i)]

    reader = StoreReader(store, sensor_infos(store, SENSORS))
    _ = reader.root  # opened once per worker, not per pass

    shards = np.random.default_rng(2).permutation(args.samples // args.shard)

    def xstars_read_raw() -> None:
        for k in shards:
            reader.read_raw(int(k) * args.shard, (int(k) + 1) * args.shard)

    def xstars_reader() -> None:
        for k in shards:
            reader.read(int(k) * args.shard, (int(k) + 1) * args.shard)

    spec = ViewSpec(global_px=224, local_px=96, local_crops=8, paired_px={"l8": 112})

    def xstars_batches() -> None:
        batches = PretrainBatches(store, BatchPlan(list(SENSORS), ["s2"], {"s2": ["ign", "l8"]}, spec, batch_size=32,
                                                   epochs=1, seed=0, shuffle_buffer=64))
        for _ in batches:
            pass

    torch.set_num_threads(2)
    results = {"png_folder": rate(png_folder, args.samples, args.repeats),
               "png_decode": rate(png_decode, args.samples, args.repeats),
               "xstars_read_raw": rate(xstars_read_raw, args.samples, args.repeats),
               "zarr_per_sample": rate(zarr_per_sample, args.samples, args.repeats),
               "xstars_reader": rate(xstars_reader, args.samples, args.repeats),
               "xstars_batches": rate(xstars_batches, args.samples // 32 * 32, max(args.repeats // 2, 1))}
    sizes = {"png_mb": sum(p.stat().st_size for p in (args.workdir / "png").rglob("*.png")) / 1e6,
             "zarr_mb": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e6}
    for name, value in results.items():
        baseline = "png_decode" if name == "xstars_read_raw" else "png_folder"
        print(json.dumps({"method": name, "samples_per_s": round(value, 1), "baseline": baseline,
                          "ratio_to_png": round(value / results[baseline], 2), "samples": args.samples,
                          "sensors": len(SENSORS), "px": 224, **{k: round(v, 1) for k, v in sizes.items()},
                          "machine": f"{platform.processor() or 'cpu'}, 2 threads"}))


if __name__ == "__main__":
    main()
