"""Data: training batches of georeferenced multi-sensor views, read from the Zarr store.

The store holds, for sample ``i``, the same ground footprint seen by every sensor on its own
grid (``<sensor>/transform[i]``). A training batch holds:

* DINO's multi-crop views (2 global, ``local_crops`` local) of one sensor, picked per batch;
* for MSAD, the other sensors' views of the **same ground box** as the first global crop, with
  the same flip/rotation. Boxes are drawn in ground coordinates (metres) and each sensor's
  view is resampled from its own pixels through its own transform, so token ``t`` of every
  sensor covers the same ground whatever the sensors' resolutions (the released code resized
  whole tiles and hoped they lined up);
* the fraction of usable pixels (not cloud, shadow or no data) under every paired view.

Reading follows the store's layout: a shard holds ``samples_per_shard`` consecutive samples and
is read in one request per array. Every (rank, worker) stream owns whole shards, reads them in
an order drawn per epoch, and mixes samples in a shuffle buffer. What a batch contains is a
pure function of (seed, epoch, rank, step, number of workers): a run resumed at any step
sees exactly the batches the uninterrupted run saw (:func:`stream_plan`, :func:`batch_rng`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from xstars.errors import DataError
from xstars.layout import open_store

log = logging.getLogger(__name__)

# A ground box: (xmin, ymin, xmax, ymax) in the store's CRS.
Box = tuple[float, float, float, float]


# =================================================================================== store


@dataclass(frozen=True)
class SensorInfo:
    """What the loader needs to know about one sensor of the store."""

    name: str
    bands: tuple[str, ...]  # the bands used, in input order
    band_index: tuple[int, ...]  # their positions in the store's band axis
    mean: np.ndarray  # per used band, physical units (from the store's training statistics)
    std: np.ndarray
    scale: float  # stored value -> physical units
    tile_px: int


def sensor_infos(path: Path | str, sensors: Sequence[str], bands: Mapping[str, Sequence[str]] | None = None,
                 ) -> dict[str, SensorInfo]:
    """Sensor descriptions from the store's attributes; ``bands`` selects a subset per sensor
    (e.g. RGB only). Raises DataError naming the sensor or band that the store lacks."""
    root = open_store(path)
    infos = {}
    for sensor in sensors:
        if sensor not in root:
            raise DataError(f"{path}: no group {sensor!r} in the store (has {sorted(root.group_keys())})")
        group = root[sensor]
        norm = group.attrs.get("normalization")
        if not norm or norm.get("mean") is None or None in norm["mean"]:
            raise DataError(f"{path}/{sensor}: no normalisation statistics (was the store finalised? "
                            "is the training split empty?)")
        names = [str(b) for b in group["band"][:]]
        wanted = list(bands[sensor]) if bands and sensor in bands else names
        unknown = [b for b in wanted if b not in names]
        if unknown:
            raise DataError(f"pretrain bands of {sensor}: {unknown} not in the store's bands {names}")
        index = tuple(names.index(b) for b in wanted)
        infos[sensor] = SensorInfo(
            name=sensor, bands=tuple(wanted), band_index=index,
            mean=np.asarray(norm["mean"], dtype=np.float32)[list(index)],
            std=np.maximum(np.asarray(norm["std"], dtype=np.float32)[list(index)], 1e-6),
            scale=float(group["data"].attrs.get("scale_factor", 1.0)), tile_px=int(group["data"].shape[-1]))
    return infos


def usable_samples(path: Path | str, sensors: Sequence[str], splits: Sequence[str]) -> np.ndarray:
    """Sample indices of ``splits`` whose status is ``ok`` for every sensor, sorted."""
    root = open_store(path)
    keep = np.isin(root[sensors[0]]["split"][:], list(splits))
    for sensor in sensors:
        keep &= root[sensor]["status"][:] == "ok"
    return np.nonzero(keep)[0]


@dataclass(frozen=True)
class RawTile:
    """One sensor's tile of one sample, as stored."""

    data: np.ndarray  # [C, H, W] stored values (int16 reflectance, uint8 DN), every band
    valid: np.ndarray | None  # [H, W] uint8; None: recorded as fully clear
    transform: np.ndarray  # GDAL geotransform of the footprint grid


class StoreReader:
    """Reads contiguous sample ranges of the store, with their validity masks.

    Opens the store lazily, once per process (each DataLoader worker opens its own). Two things
    make a shard read fast (``bench/bench_loader.py``): zarr decodes all the inner chunks of the
    range in one batch rather than one at a time, and the validity masks of a range whose
    samples are all recorded as fully clear (``cloud_fraction`` 0: no cloud, shadow or no-data
    pixel) are not read at all, since they are all ones (most orthophoto shards).
    """

    def __init__(self, path: Path | str, infos: Mapping[str, SensorInfo]) -> None:
        self.path = str(path)
        self.infos = dict(infos)
        self._root = None
        self._transforms: dict[str, np.ndarray] = {}
        self._clear: dict[str, np.ndarray] = {}
        self._arrays: dict[str, tuple[Any, Any]] = {}  # (data, valid): opened once, not per read

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_root": None, "_arrays": {}}  # a worker opens its own handles

    @property
    def root(self):
        if self._root is None:
            self._root = open_store(self.path)
            for sensor in self.infos:
                group = self._root[sensor]
                self._arrays[sensor] = (group["data"], group["valid"])
                self._transforms[sensor] = group["transform"][:]
                # Stores without the per-sample fraction (older layouts) read every mask.
                fraction = group["cloud_fraction"][:] if "cloud_fraction" in group else None
                self._clear[sensor] = (fraction == 0) if fraction is not None else np.zeros(group["status"].shape[0], bool)
        return self._root

    @property
    def samples_per_shard(self) -> int:
        return int(self.root.attrs["xstars"]["samples_per_shard"])

    def read_raw(self, lo: int, hi: int) -> dict[int, dict[str, RawTile]]:
        """Samples ``lo..hi-1`` as stored (sample -> sensor -> tile): one request per array.

        Kept as integers until a sample is used (:func:`normalise`): a shuffle buffer of raw
        tiles is 2-4x smaller than of float32 ones, and each sample is converted in one small,
        cache-friendly pass (converting whole shards took a third of the loader's time).
        """
        import zarr

        out: dict[int, dict[str, RawTile]] = {i: {} for i in range(lo, hi)}
        with zarr.config.set({"codec_pipeline.batch_size": max(hi - lo, 1)}):
            _ = self.root
            for sensor in self.infos:
                data_array, valid_array = self._arrays[sensor]
                data = data_array[lo:hi]  # whole inner chunks, all bands
                clear = self._clear[sensor][lo:hi]
                # A range with any cloudy sample is read whole: zarr's cost is per inner chunk,
                # and a selection of some samples costs more than the whole shard (measured:
                # 44 ms for 16 of 64 masks, 17 ms for all 64).
                valid = None if clear.all() else valid_array[lo:hi]
                for k, i in enumerate(range(lo, hi)):
                    mask = None if valid is None or clear[k] else valid[k]
                    out[i][sensor] = RawTile(data[k], mask, self._transforms[sensor][i])
        return out

    def read(self, lo: int, hi: int) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]]]:
        """Samples ``lo..hi-1``: sample -> sensor -> (image [C,H,W] normalised, valid [H,W], transform)."""
        return {i: {sensor: normalise(tile, self.infos[sensor]) for sensor, tile in tiles.items()}
                for i, tiles in self.read_raw(lo, hi).items()}


def normalise(tile: RawTile, info: SensorInfo) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(image [C,H,W] float32 normalised, valid [H,W] float32, transform) of the used bands.

    ``(x * scale - mean) / std`` in one pass to float32 and one in place; invalid pixels are
    set to 0, i.e. to the band's mean.
    """
    raw = tile.data
    if list(info.band_index) != list(range(raw.shape[0])):
        raw = raw[list(info.band_index)]
    data = np.multiply(raw, (info.scale / info.std)[:, None, None], dtype=np.float32)
    data -= (info.mean / info.std)[:, None, None]
    if tile.valid is None:
        valid = torch.ones(raw.shape[1:], dtype=torch.float32)
    else:
        data *= tile.valid
        valid = torch.from_numpy(tile.valid.astype(np.float32))
    return torch.from_numpy(data), valid, tile.transform


# ==================================================================================== plan


def shard_chunks(samples: Sequence[int], samples_per_shard: int, min_chunks: int = 1) -> list[list[int]]:
    """The samples grouped by shard (the unit of reading), split further when there are fewer
    chunks than ``min_chunks`` streams (small stores) so that every stream has data."""
    chunks: dict[int, list[int]] = {}
    for i in samples:
        chunks.setdefault(int(i) // samples_per_shard, []).append(int(i))
    out = [chunks[k] for k in sorted(chunks)]
    while len(out) < min_chunks and any(len(c) > 1 for c in out):
        largest = max(range(len(out)), key=lambda k: len(out[k]))
        chunk = out.pop(largest)
        out[largest:largest] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]
    return out


def stream_plan(chunks: Sequence[Sequence[int]], n_streams: int, stream: int, n_samples: int,
                buffer: int, seed: int, epoch: int) -> list[list[int]]:
    """The chunks a stream reads, in order, and the order it emits ``n_samples`` samples.

    Chunks are dealt to streams after an epoch-wide permutation (same on every rank); a stream
    reads its chunks in sequence and emits samples through a shuffle buffer of ``buffer``
    samples. When its chunks hold fewer than ``n_samples``, it goes through them again (a new
    order) until it has emitted enough. Returns the emission order, as one list per pass.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
    mine = [list(chunks[k]) for k in order[stream::n_streams]]
    if not mine:
        mine = [list(chunks[k]) for k in order[stream % len(chunks)::len(chunks)]] if chunks else []
    if not mine or not any(mine):
        raise DataError("no training sample to read (empty split?)")
    rng = np.random.default_rng([seed, epoch, stream])
    passes, emitted = [], 0
    while emitted < n_samples:
        sequence = [i for k in (rng.permutation(len(mine)) if passes else range(len(mine))) for i in mine[k]]
        out, pool = [], []
        for i in sequence:
            pool.append(i)
            if len(pool) >= buffer:
                out.append(pool.pop(int(rng.integers(len(pool)))))
        while pool:
            out.append(pool.pop(int(rng.integers(len(pool)))))
        out = out[: n_samples - emitted]
        passes.append(out)
        emitted += len(out)
    return passes


def batch_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The random stream of one batch's augmentations: independent of workers and of resuming."""
    return np.random.default_rng([seed, 1_000_003, epoch, rank, step])


# ============================================================================ augmentation


def footprint_box(transform: Sequence[float], tile_px: int) -> Box:
    """Ground bounds of a tile from its GDAL geotransform (north-up)."""
    x0, dx, _, y0, _, dy = transform
    return (x0, y0 + dy * tile_px, x0 + dx * tile_px, y0)


def random_box(rng: np.random.Generator, bounds: Box, scale: Sequence[float],
               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
    """A box of ``scale`` (fraction of the area) and aspect ``ratio`` inside ``bounds``:
    torchvision's RandomResizedCrop, in metres."""
    xmin, ymin, xmax, ymax = bounds
    width, height = xmax - xmin, ymax - ymin
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= width and h <= height:
            x = xmin + rng.uniform(0, width - w)
            y = ymin + rng.uniform(0, height - h)
            return (x, y, x + w, y + h)
    return bounds


def resample_box(image: torch.Tensor, transform: Sequence[float], box: Box, out_px: int) -> torch.Tensor:
    """The ground ``box`` of ``image`` ([C, H, W] on the grid ``transform``) as ``out_px`` pixels.

    Output pixel centres are mapped to ground coordinates and back into the source grid, so
    the result is exact whatever the two resolutions. When the source is finer than the output
    it is first reduced with an antialiasing filter (no aliasing of 1 m orthophotos into 224
    pixels); the reduced grid's geometry is tracked exactly.
    """
    x0, dx, _, y0, _, dy = transform
    xmin, ymin, xmax, ymax = box
    # The box in source pixel coordinates (continuous: pixel j spans [j, j + 1)).
    col0, col1 = (xmin - x0) / dx, (xmax - x0) / dx
    row0, row1 = (y0 - ymax) / -dy, (y0 - ymin) / -dy
    _, height, width = image.shape
    r0, c0 = max(math.floor(row0) - 1, 0), max(math.floor(col0) - 1, 0)
    r1, c1 = min(math.ceil(row1) + 1, height), min(math.ceil(col1) + 1, width)
    window = image[None, :, r0:r1, c0:c1]
    factor = max((row1 - row0) / out_px, (col1 - col0) / out_px)
    if factor > 1.5:
        size = (max(round((r1 - r0) / factor), 1), max(round((c1 - c0) / factor), 1))
        window = F.interpolate(window, size=size, mode="bilinear", antialias=True, align_corners=False)
    sy, sx = window.shape[-2] / (r1 - r0), window.shape[-1] / (c1 - c0)  # window px per source px
    centres = (torch.arange(out_px, dtype=torch.float32) + 0.5) / out_px
    cols = (col0 + centres * (col1 - col0) - c0) * sx  # continuous coordinates in the window
    rows = (row0 + centres * (row1 - row0) - r0) * sy
    grid_x = 2 * cols / window.shape[-1] - 1
    grid_y = 2 * rows / window.shape[-2] - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(window, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def dihedral(x: torch.Tensor, rotation: int, flip: bool) -> torch.Tensor:
    """One of the 8 symmetries of the square (overhead images have no 'up')."""
    x = torch.rot90(x, rotation, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(math.ceil(3 * sigma), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)[0]


def photometric(x: torch.Tensor, rng: np.random.Generator, blur_p: float) -> torch.Tensor:
    """Brightness/contrast jitter (whole view, then small per band) and Gaussian blur, on
    normalised values: DINO's colour jitter and blur, made band-agnostic."""
    if rng.random() < 0.8:
        gain = rng.uniform(0.6, 1.4) * rng.uniform(0.9, 1.1, size=x.shape[0])
        bias = rng.uniform(-0.4, 0.4) + rng.uniform(-0.1, 0.1, size=x.shape[0])
        x = x * torch.from_numpy(gain.astype(np.float32))[:, None, None] + torch.from_numpy(
            bias.astype(np.float32))[:, None, None]
    if rng.random() < blur_p:
        x = gaussian_blur(x, float(rng.uniform(0.1, 2.0)))
    return x


@dataclass(frozen=True)
class ViewSpec:
    """Sizes of the views (``pretrain.views``)."""

    global_px: int = 224
    local_px: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    paired_px: Mapping[str, int] | None = None  # per sensor; default global_px

    @classmethod
    def from_config(cls, views: Mapping[str, Any]) -> ViewSpec:
        return cls(global_px=views["global_px"], local_px=views["local_px"], local_crops=views["local_crops"],
                   global_scale=tuple(views["global_scale"]), local_scale=tuple(views["local_scale"]),
                   paired_px=dict(views.get("paired_px", {})))

    def paired_size(self, sensor: str) -> int:
        return int((self.paired_px or {}).get(sensor, self.global_px))


def sample_views(sample: Mapping[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]], sensor: str,
                 paired: Sequence[str], spec: ViewSpec, rng: np.random.Generator) -> dict[str, Any]:
    """One sample's views: DINO crops of ``sensor``, and the ``paired`` sensors' views of the
    ground box of the first global crop, with its flip/rotation."""
    image, _valid, transform = sample[sensor]
    bounds = footprint_box(transform, image.shape[-1])
    for other in paired:
        other_bounds = footprint_box(sample[other][2], sample[other][0].shape[-1])
        if max(abs(a - b) for a, b in zip(bounds, other_bounds, strict=True)) > 1e-3:
            raise DataError(f"footprints of {sensor} {bounds} and {other} {other_bounds} differ: "
                            "the store's grids are not co-located")
    crops, first = [], None
    blur = (1.0, 0.1) + (0.5,) * spec.local_crops
    sizes = [(spec.global_px, spec.global_scale)] * 2 + [(spec.local_px, spec.local_scale)] * spec.local_crops
    for k, (px, scale) in enumerate(sizes):
        box = random_box(rng, bounds, scale)
        rotation, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        if k == 0:
            first = (box, rotation, flip)
        view = dihedral(resample_box(image, transform, box, px), rotation, flip)
        crops.append(photometric(view, rng, blur[k]))
    box, rotation, flip = first
    views = {"crops": crops, "paired": {}, "valid": {}}
    for name in (sensor, *paired):
        img, mask, tr = sample[name]
        px = spec.global_px if name == sensor else spec.paired_size(name)
        if name != sensor:
            views["paired"][name] = dihedral(resample_box(img, tr, box, px), rotation, flip)
        views["valid"][name] = dihedral(resample_box(mask[None], tr, box, px), rotation, flip)[0]
    return views


def collate(per_sample: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n_crops = len(per_sample[0]["crops"])
    return {
        "crops": [torch.stack([s["crops"][k] for s in per_sample]) for k in range(n_crops)],
        "paired": {name: torch.stack([s["paired"][name] for s in per_sample]) for name in per_sample[0]["paired"]},
        "valid": {name: torch.stack([s["valid"][name] for s in per_sample]) for name in per_sample[0]["valid"]},
    }


# ================================================================================= dataset


@dataclass(frozen=True)
class BatchPlan:
    """What the pretraining batches are made of: the sensors and their roles, the views, the
    batch size and length, and how the stream is divided between ranks and workers."""

    sensors: Sequence[str]
    dino_sensors: Sequence[str]  # one drawn per batch for DINO's views
    paired_sensors: Mapping[str, Sequence[str]]  # DINO sensor -> the sensors paired with it (MSAD)
    spec: ViewSpec
    batch_size: int  # per rank
    epochs: int
    seed: int
    splits: Sequence[str] = ("train",)
    bands: Mapping[str, Sequence[str]] | None = None  # per sensor (default: every stored band)
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 64
    pairs_per_step: int = 0  # paired sensors drawn per step (0: all of them)


class PretrainBatches(IterableDataset):
    """Batches for X-STARS pretraining, from step ``start_step`` to the end of ``epochs``.

    Use with ``DataLoader(dataset, batch_size=None, num_workers=W)`` and the same ``W`` as
    ``num_workers`` here: each worker serves one stream (its own shards) and the DataLoader's
    round-robin order over workers is the global step order. Every batch carries its
    ``epoch`` and ``step`` so the loop can check it.
    """

    def __init__(self, path: Path | str, plan: BatchPlan, start_step: int = 0) -> None:
        super().__init__()
        self.plan = plan
        self.infos = sensor_infos(path, plan.sensors, plan.bands)
        self.reader = StoreReader(path, self.infos)
        self.samples = usable_samples(path, plan.sensors, plan.splits)
        if len(self.samples) == 0:
            raise DataError(f"{path}: no sample of splits {list(plan.splits)} is usable by every sensor of "
                            f"{list(plan.sensors)}")
        self.dino_sensors = list(plan.dino_sensors)
        self.paired_sensors = {k: list(v) for k, v in plan.paired_sensors.items()}
        self.spec, self.batch_size, self.epochs, self.seed = plan.spec, plan.batch_size, plan.epochs, plan.seed
        self.workers, self.rank, self.world_size = max(plan.num_workers, 1), plan.rank, plan.world_size
        self.shuffle_buffer, self.start_step = max(plan.shuffle_buffer, 1), start_step
        self.pairs_per_step = plan.pairs_per_step
        self.steps_per_epoch = steps_per_epoch(len(self.samples), self.batch_size, self.world_size, self.workers)
        self.chunks = shard_chunks(self.samples, self.reader.samples_per_shard, self.world_size * self.workers)

    def __len__(self) -> int:
        return self.epochs * self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise DataError(f"DataLoader has {info.num_workers} workers, the dataset was planned for {self.workers}")
        if info is None and self.workers > 1:
            raise DataError(f"the dataset was planned for {self.workers} workers: iterate it through a DataLoader")
        # Worker w serves global steps start + w, start + w + W, ...: the stream they fall in.
        stream = (self.start_step + worker) % self.workers
        n_streams = self.world_size * self.workers
        for epoch in range(self.start_step // self.steps_per_epoch, self.epochs):
            first = max(self.start_step - epoch * self.steps_per_epoch, 0)
            yield from self._epoch(epoch, stream, n_streams, first)

    def _epoch(self, epoch: int, stream: int, n_streams: int, first: int) -> Iterator[dict[str, Any]]:
        """The batches of ``stream`` (within this rank) in ``epoch``, from step ``first`` on."""
        steps = range(stream, self.steps_per_epoch, self.workers)  # batch k of the stream is steps[k]
        passes = stream_plan(self.chunks, n_streams, self.rank * self.workers + stream, len(steps) * self.batch_size,
                             self.shuffle_buffer, self.seed, epoch)
        order = [i for p in passes for i in p]
        batches = [order[k * self.batch_size:(k + 1) * self.batch_size] for k in range(len(steps))]
        remaining: dict[int, int] = {}
        for g, batch_ids in zip(steps, batches, strict=True):
            for i in batch_ids if g >= first else ():  # skipped batches (resume) are never read
                remaining[i] = remaining.get(i, 0) + 1
        chunk_of = {i: chunk for chunk in self.chunks for i in chunk}
        cache: dict[int, Any] = {}
        for g, batch_ids in zip(steps, batches, strict=True):
            if g < first:
                continue
            for i in batch_ids:
                if i not in cache:  # read the whole chunk: the buffer holds its other samples
                    chunk = chunk_of[i]
                    fresh = self.reader.read_raw(min(chunk), max(chunk) + 1)
                    cache.update({j: fresh[j] for j in chunk if remaining.get(j, 0) > 0 and j not in cache})
            sensor, paired = self.step_sensors(epoch, g)
            rng = batch_rng(self.seed, epoch, self.rank, g)
            with _one_thread():
                views = []
                for i in batch_ids:
                    tiles = {name: normalise(cache[i][name], self.infos[name]) for name in (sensor, *paired)}
                    views.append(sample_views(tiles, sensor, paired, self.spec, rng))
            for i in batch_ids:
                remaining[i] -= 1
                if remaining[i] == 0:
                    cache.pop(i, None)
            yield {"epoch": epoch, "step": g, "sensor": sensor, "index": torch.tensor(batch_ids), **collate(views)}


    def step_sensors(self, epoch: int, step: int) -> tuple[str, list[str]]:
        """The DINO sensor of a step and the sensors paired with it: the same on every rank (so
        every rank uses the same parameters) and drawn per step (``pairs_per_step`` of them)."""
        rng = np.random.default_rng([self.seed, epoch, step])
        sensor = self.dino_sensors[int(rng.integers(len(self.dino_sensors)))]
        paired = self.paired_sensors[sensor]
        if 0 < self.pairs_per_step < len(paired):
            paired = [paired[k] for k in sorted(rng.choice(len(paired), self.pairs_per_step, replace=False))]
        return sensor, list(paired)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small tensor operations on one thread: with several, OpenMP's synchronisation costs more
    than the work (100x slower blurs when the cores are busy). DataLoader workers already run
    on one thread; this covers loading in the training process (num_workers 0)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int, workers: int) -> int:
    """Steps of one epoch on each rank: whole batches, a multiple of the workers (at least one
    step per worker), so that every worker always serves the same stream."""
    steps = n_samples // (batch_size * world_size)
    return max(workers, steps // workers * workers)
