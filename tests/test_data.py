"""The training loader: georeferenced paired views, shard-sequential reading, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.synthetic_store import ground_field, write_store
from xstars import data
from xstars.data import BatchPlan, PretrainBatches, ViewSpec
from xstars.errors import DataError

PAIRED = {"s2": ["l8", "ign"], "ign": ["s2", "l8"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "dataset.zarr", samples=12, samples_per_shard=4,
                       invalid={1: 0.5})


def batches(store: Path, start_step: int = 0, **kwargs) -> PretrainBatches:
    settings = {"sensors": ["s2", "l8", "ign"], "dino_sensors": ["s2", "ign"], "paired_sensors": PAIRED,
                "spec": ViewSpec(global_px=48, local_px=16, local_crops=2), "batch_size": 2, "epochs": 2, "seed": 3,
                "shuffle_buffer": 3} | kwargs
    return PretrainBatches(store, BatchPlan(**settings), start_step=start_step)


def test_resample_box_maps_ground_to_ground_across_resolutions() -> None:
    # One ground field on a 10 m and on a 2 m grid: the same box gives the same picture.
    x0, y0 = 500000.0, 6500000.0
    images = {}
    for gsd in (10.0, 2.0):
        px = int(480 / gsd)
        centres = (np.arange(px) + 0.5) * gsd
        x, y = np.meshgrid(x0 + centres, y0 - centres)
        images[gsd] = torch.from_numpy(ground_field(x, y, 0, 0)[None].astype(np.float32))
    box = (x0 + 97.0, y0 - 401.0, x0 + 353.0, y0 - 145.0)  # not on either grid
    coarse = data.resample_box(images[10.0], (x0, 10.0, 0, y0, 0, -10.0), box, 32)
    fine = data.resample_box(images[2.0], (x0, 2.0, 0, y0, 0, -2.0), box, 32)
    centres = box[0] + (np.arange(32) + 0.5) * 8.0, box[3] - (np.arange(32) + 0.5) * 8.0
    truth = ground_field(*np.meshgrid(*centres), 0, 0)
    # Both are the field at the output pixel centres, up to interpolation (the field varies
    # over ~100 m: a 10 m grid resolves it to ~1e-2).
    assert np.abs(coarse[0].numpy() - truth).max() < 0.02
    assert np.abs(fine[0].numpy() - truth).max() < 0.02
    # A box one output pixel (8 m) to the east is visibly a different picture.
    shifted = data.resample_box(images[2.0], (x0, 2.0, 0, y0, 0, -2.0), (box[0] + 8, box[1], box[2] + 8, box[3]), 32)
    assert np.abs(shifted[0].numpy() - truth).max() > 0.02
    assert np.allclose(shifted[0, :, :-1].numpy(), fine[0, :, 1:].numpy(), atol=0.01)


def test_paired_views_see_the_same_ground(store: Path) -> None:
    reader = data.StoreReader(store, data.sensor_infos(store, ["s2", "l8", "ign"]))
    sample = reader.read(0, 1)[0]
    spec = ViewSpec(global_px=32, local_px=16, local_crops=1)
    for seed in range(5):
        views = data.sample_views(sample, "l8", ["s2", "ign"], spec, np.random.default_rng(seed))
        # The paired views repeat the first crop's ground box and symmetry, each from its own
        # grid (10 m and 2 m): back in physical units they show the same ground.
        physical = {s: (views["paired"][s][0] * reader.infos[s].std[0] + reader.infos[s].mean[0]).numpy()
                    for s in ("s2", "ign")}
        error = np.abs(physical["s2"] - physical["ign"])
        # Up to interpolation of a 10 m grid; one output pixel of misalignment would be far more.
        offset = np.abs(physical["s2"][:, 1:] - physical["ign"][:, :-1]).mean()
        assert error.mean() < 0.015 and error.max() < 0.05 and error.mean() < offset / 2
        assert views["crops"][0].shape == (3, 32, 32)  # l8's three bands
    # The same sample with another seed is another box: the views differ.
    other = data.sample_views(sample, "l8", ["s2", "ign"], spec, np.random.default_rng(99))
    assert not torch.allclose(other["paired"]["s2"], views["paired"]["s2"], atol=0.1)


def test_invalid_pixels_are_reported_under_the_paired_views(store: Path) -> None:
    reader = data.StoreReader(store, data.sensor_infos(store, ["s2", "ign"]))
    sample = reader.read(1, 2)[1]  # the top half of sample 1 is unusable in every sensor
    image, valid, _ = sample["s2"]
    assert valid[:24].sum() == 0 and valid[24:].min() == 1
    assert image[:, :24].abs().max() == 0  # set to the band mean, i.e. 0 once normalised
    views = data.sample_views(sample, "s2", ["ign"], ViewSpec(global_px=32, local_px=16, local_crops=0,
                                                               global_scale=(1.0, 1.0)), np.random.default_rng(0))
    for sensor in ("s2", "ign"):
        assert 0.4 < views["valid"][sensor].mean() < 0.6


@pytest.mark.parametrize("invalid", [{1: 0.5}, {0: 0.25, 1: 0.5, 3: 0.1}, None])
def test_reader_masks_equal_the_stored_masks(tmp_path: Path, invalid: dict | None) -> None:
    # One cloudy sample in a shard (read alone), most of a shard cloudy (read whole), none; and
    # a store without the per-sample fraction (every mask read).
    import zarr

    path = write_store(tmp_path / "dataset.zarr", samples=8, samples_per_shard=4, invalid=invalid)
    if invalid is None:
        for sensor in ("s2", "ign"):
            del zarr.open_group(str(path), mode="r+")[sensor]["cloud_fraction"]
    root = zarr.open_group(str(path), mode="r")
    reader = data.StoreReader(path, data.sensor_infos(path, ["s2", "ign"]))
    for lo, hi in ((0, 4), (4, 8), (1, 3)):
        tiles = reader.read(lo, hi)
        for sensor in ("s2", "ign"):
            stored = root[sensor]["valid"][lo:hi]
            read = np.stack([tiles[i][sensor][1].numpy() for i in range(lo, hi)])
            assert read.dtype == np.float32 and np.array_equal(read, stored), (sensor, lo, hi)
            images = np.stack([tiles[i][sensor][0].numpy() for i in range(lo, hi)])
            assert np.all(images[np.broadcast_to(stored[:, None] == 0, images.shape)] == 0)


def test_stream_plan_reads_whole_shards_and_emits_each_sample_once() -> None:
    chunks = data.shard_chunks(list(range(20)), samples_per_shard=4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    plans = [data.stream_plan(chunks, 2, s, n_samples=8, buffer=4, seed=0, epoch=0) for s in range(2)]
    emitted = [i for plan in plans for i in plan[0]]
    assert len(emitted) == len(set(emitted)) == 16  # no sample twice, in any stream
    owned = [{i // 4 for i in plan[0]} for plan in plans]
    assert not owned[0] & owned[1]  # every shard is read by one stream only
    # Another epoch reads the shards in another order; the same epoch always in the same one.
    assert data.stream_plan(chunks, 2, 0, 8, 4, 0, 1) != plans[0]
    assert data.stream_plan(chunks, 2, 0, 8, 4, 0, 0) == plans[0]
    # Fewer shards than streams: shards are split so that every stream has samples.
    assert len(data.shard_chunks([0, 1, 2, 3], 4, min_chunks=4)) == 4


def test_batches_have_the_expected_views(store: Path) -> None:
    ds = batches(store)
    assert ds.steps_per_epoch == 4  # 8 training samples / batch 2
    batch = next(iter(ds))
    assert [c.shape[-1] for c in batch["crops"]] == [48, 48, 16, 16]
    assert batch["crops"][0].shape[:2] == (2, 4 if batch["sensor"] != "l8" else 3)
    assert set(batch["paired"]) == set(PAIRED[batch["sensor"]])
    assert set(batch["valid"]) == {batch["sensor"], *PAIRED[batch["sensor"]]}
    assert all(int(i) < 8 for i in batch["index"])  # the train split only


def test_one_pair_per_step_is_drawn_per_step_and_the_same_on_every_rank(store: Path) -> None:
    ranks = [list(batches(store, pairs_per_step=1, rank=r, world_size=2, epochs=6)) for r in (0, 1)]
    seen = set()
    for a, b in zip(*ranks, strict=True):
        assert len(a["paired"]) == 1 and set(a["paired"]) <= set(PAIRED[a["sensor"]])
        assert (a["sensor"], set(a["paired"])) == (b["sensor"], set(b["paired"]))  # same parameters used
        assert set(a["valid"]) == {a["sensor"], *a["paired"]}
        seen.add((a["sensor"], *a["paired"]))
    assert len(seen) == 4  # every (DINO sensor, paired sensor) pair, drawn step by step
    # 0 (the default) pairs every other sensor, every step.
    assert all(set(b["paired"]) == set(PAIRED[b["sensor"]]) for b in batches(store, pairs_per_step=0))


def test_resumed_dataset_yields_the_same_batches(store: Path) -> None:
    full = list(batches(store))
    assert len(full) == 8
    resumed = list(batches(store, start_step=3))
    assert len(resumed) == 5
    for a, b in zip(full[3:], resumed, strict=True):
        assert (a["epoch"], a["step"], a["sensor"]) == (b["epoch"], b["step"], b["sensor"])
        assert torch.equal(a["index"], b["index"])
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"], strict=True))


def test_workers_read_their_own_shards_in_step_order(store: Path) -> None:
    def run(start: int) -> list[dict]:
        ds = batches(store, num_workers=2, start_step=start)
        return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))

    full = run(0)
    assert [b["epoch"] * 4 + b["step"] for b in full] == list(range(8))
    for epoch in (0, 1):
        shards = [{int(i) // 4 for b in full if b["epoch"] == epoch and b["step"] % 2 == w for i in b["index"]}
                  for w in (0, 1)]
        assert not shards[0] & shards[1]
    resumed = run(3)  # an odd step: the first batch now comes from the other worker's stream
    assert [b["epoch"] * 4 + b["step"] for b in resumed] == list(range(3, 8))
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["crops"][1], b["crops"][1])


def test_reads_whole_shards_once_per_epoch(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    original = data.StoreReader.read_raw

    def counting(self, lo, hi):
        reads.append((lo, hi))
        return original(self, lo, hi)

    monkeypatch.setattr(data.StoreReader, "read_raw", counting)
    list(batches(store, epochs=1))
    # 8 training samples in shards [0-3] and [4-7]: one read each, never one sample at a time.
    assert sorted(reads) == [(0, 4), (4, 8)]


def test_bad_input_names_the_problem(store: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"pretrain bands of s2: \['B99'\] not in the store's bands"):
        data.sensor_infos(store, ["s2"], {"s2": ["B99"]})
    with pytest.raises(DataError, match="no group 'modis'"):
        data.sensor_infos(store, ["modis"])
    with pytest.raises(DataError, match=r"no sample of splits \['val'\]"):
        batches(store, splits=["val"])
