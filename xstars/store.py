"""Store: the analysis-ready multi-sensor dataset as one sharded Zarr v3 store.

Layout (``<results>/dataset/dataset.zarr``), one group per sensor of the config (``s2``,
``l8``, ``ign``, ``labels``... in :func:`xstars.sensors.sensors_of` order, recorded with their
role in the root attribute ``xstars.sensors``), each with::

    data        (sample, band, y, x)  as the sensor's unit rule stores it (xstars/sensors.py):
                                      int16 reflectance x 10^4 (CF scale_factor), uint8 DN with
                                      its scale (aerial images: 1/255), uint8 class (labels)
    valid       (sample, y, x)        uint8, 1 where the pixel is usable (not cloud, shadow, no data)
    band        (band,)               band names
    site_id, region (city), split, status, date, item_id (sample,) strings; transform (sample, 6) of the
    footprint grid in ``crs``; cloud_fraction (invalid fraction of the footprint);
    shift_x_m, shift_y_m, shift_confidence, shift_applied, shift_flag: the co-registration
    spatial_ref                       CF grid mapping (crs_wkt): what rioxarray reads

One inner chunk is one sample of one sensor; a shard holds ``build.samples_per_shard`` samples.
Samples are the manifest's sites in site-id order, so sample ``i`` is the same site in every
group. A site the catalog dropped is stored too, as ``dropped: <reason>`` with no pixel: the
number of samples, hence of build jobs, is the number of sites, which the config alone fixes
(:func:`planned_sites`), so a dry run of the workflow lists every job before any search.
A build job (:func:`build_part`) writes exactly one shard of every array, never a part of
another job's: jobs run in parallel on a shared filesystem, and a job killed
mid-write is simply run again (its shard is rewritten whole). :func:`finalize` checks that
every part is there, computes the normalisation statistics on the training split and
consolidates the metadata. Two builds from the same manifest are identical in array content.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xstars.errors import DataError, ServiceError
from xstars.layout import LAYOUT_VERSION, open_store
from xstars.manifest import DropReason, Manifest, ManifestRow, file_sha256
from xstars.sensors import Sensor, image_sensors, sensors_of

log = logging.getLogger(__name__)

PER_SAMPLE_STRINGS = ("site_id", "region", "split", "status", "date", "item_id", "shift_flag")
PER_SAMPLE_FLOATS = ("cloud_fraction", "shift_x_m", "shift_y_m", "shift_confidence")


def stored_sites(manifest: Manifest) -> list[str]:
    """The site ids stored, in sample order: every site of the manifest, sorted."""
    return manifest.site_ids()


def planned_sites(config: Mapping[str, Any]) -> int:
    """The number of sites (samples) a build of ``config`` stores, known before any job runs:
    the frozen manifest's sites, or the count :func:`xstars.sites.sample_sites` draws exactly."""
    frozen = config["catalog"]["manifest"]
    if frozen:
        import pyarrow.parquet as pq

        try:
            return len(set(pq.read_table(frozen, columns=["site_id"]).column("site_id").to_pylist()))
        except (OSError, KeyError, ValueError) as err:
            raise DataError(f"catalog.manifest {frozen}: not a readable manifest ({err})") from None
    from xstars.sites import site_count

    return site_count(config)


def n_parts(n_samples: int, samples_per_shard: int) -> int:
    return max(1, math.ceil(n_samples / samples_per_shard))


def init_store(path: Path, manifest: Manifest, config: Mapping[str, Any]) -> int:
    """Create the store's groups and arrays (metadata only); returns the number of samples."""
    import zarr
    from pyproj import CRS

    n = manifest.n_sites
    per_shard = int(config["build"]["samples_per_shard"])
    sensors = sensors_of(config)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["xstars"] = {"layout_version": LAYOUT_VERSION, "samples": n, "samples_per_shard": per_shard, "parts": n_parts(n, per_shard),
                            "crs": config["sites"]["crs"], "footprint_m": config["sites"]["footprint_m"],
                            "coregister_reference": config["build"]["coregister_reference"],
                            "sensors": {name: {"role": s.role, "kind": s.kind, "gsd_m": s.gsd_m, "bands": s.bands,
                                               "rgb_bands": s.rgb_bands} for name, s in sensors.items()}}
    wkt = CRS.from_user_input(config["sites"]["crs"]).to_wkt()
    for name, sensor in sensors.items():
        group = root.create_group(name)
        bands = sensor.bands
        size = sensor.pixels(config["sites"]["footprint_m"])
        encoding = sensor.encoding
        group.create_array("data", shape=(n, len(bands), size, size), dtype=encoding.dtype,
                           chunks=(1, len(bands), size, size), shards=(per_shard, len(bands), size, size),
                           fill_value=0, dimension_names=["sample", "band", "y", "x"], attributes=encoding.attrs)
        group.create_array("valid", shape=(n, size, size), dtype="uint8", chunks=(1, size, size),
                           shards=(per_shard, size, size), fill_value=0, dimension_names=["sample", "y", "x"],
                           attributes={"long_name": "1 where the pixel is usable", "grid_mapping": "spatial_ref"})
        band_array = group.create_array("band", shape=(len(bands),), dtype=str, dimension_names=["band"])
        band_array[:] = np.array(bands, dtype=object)
        for name in PER_SAMPLE_STRINGS:
            group.create_array(name, shape=(n,), dtype=str, chunks=(per_shard,), dimension_names=["sample"])
        for name in PER_SAMPLE_FLOATS:
            group.create_array(name, shape=(n,), dtype="float32", chunks=(per_shard,), fill_value=np.nan,
                               dimension_names=["sample"])
        group.create_array("shift_applied", shape=(n,), dtype="uint8", chunks=(per_shard,), fill_value=0,
                           dimension_names=["sample"])
        group.create_array("transform", shape=(n, 6), dtype="float64", chunks=(per_shard, 6), fill_value=np.nan,
                           dimension_names=["sample", "affine"],
                           attributes={"long_name": "GDAL geotransform of the footprint grid, in spatial_ref"})
        ref = group.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0, dimension_names=[],
                                 attributes={"crs_wkt": wkt, "spatial_ref": wkt})
        ref[()] = 0
    return n


def build_part(path: Path, manifest: Manifest, config: Mapping[str, Any], part: int,
               staging: Path | None = None) -> dict[str, Any]:
    """Acquire, co-register and write the samples of one part (one shard of every array).

    With ``staging`` (``build.sites_per_group > 0``: :mod:`xstars.staging`) the part reads
    nothing: it packs its sites' samples, which the locality groups' jobs (:func:`build_group`)
    acquired and co-registered, into the same shard. Returns the part's records (one per site:
    status, per-sensor item, shift, fractions). A site whose chosen scene and fallbacks are all
    unusable for a sensor is stored as ``dropped: <reason>`` with no valid pixel.
    """
    started = time.perf_counter()
    plan = plan_part(manifest, config, part, with_items=staging is None)
    log.info("build part=%d planned: sites=%d items=%d in %.2fs", part, len(plan.sites),
             sum(len(v) for v in plan.items.values()), time.perf_counter() - started)
    root = open_store(path, mode="r+")
    first, last = plan.first, plan.last
    sensors = sensors_of(config)
    buffers = {name: _empty_buffers(sensor, last - first, config) for name, sensor in sensors.items()}
    records: list[dict[str, Any]] = []
    if staging is None:
        for offset, (head, tiles, reason, tried, dropped_by) in enumerate(
                _acquired_sites(plan.sites, plan.items, config, f"part {part}")):
            _store_site(buffers, records, offset, head.site_id, head.split, tiles, reason, tried, config,
                        dropped_by, head.region)
    else:
        _unstage(buffers, records, plan, manifest, config, Path(staging))
    for sensor in sensors:
        group = root[sensor]
        for name, values in buffers[sensor].items():
            # A part owns its shard whole: a shard left half-written by a killed job is deleted
            # first, or zarr would try to decode it to merge the new samples into it.
            _shard_file(Path(path), sensor, name, part, values.ndim).unlink(missing_ok=True)
            group[name][first:last] = values
    # None: zarr writes no file for a shard that is all fill value (e.g. no shift flag at all).
    checksums = {}
    for sensor in sensors:
        for name, values in buffers[sensor].items():
            shard = _shard_file(Path(path), sensor, name, part, values.ndim)
            checksums[f"{sensor}/{name}"] = file_sha256(shard) if shard.exists() else None
    # The part's share of the normalisation statistics, from what it has in memory: finalize
    # only adds the parts' sums up instead of reading the training split back (0.5 TB for France).
    statistics = {name: _partial_statistics(buffers[name], sensor.encoding.scale_factor)
                  for name, sensor in image_sensors(config).items()}
    seconds = time.perf_counter() - started
    log.info("build part=%d sites=%d dropped=%d seconds=%.1f", part, last - first,
             sum(r["status"] != "ok" for r in records), seconds)
    return {"part": part, "first": first, "last": last, "records": records, "checksums": checksums,
            "statistics": statistics}


def build_group(staging: Path, manifest: Manifest, config: Mapping[str, Any], group: int) -> dict[str, Any]:
    """Acquire and co-register the sites of locality group ``group`` (:mod:`xstars.staging`),
    in the group's order, and stage each site's sample for the part that stores it.

    Memory stays flat in the group's size: a few sites are read ahead, each is staged as soon
    as it is co-registered. Returns the group's record (its sites, what was dropped)."""
    from xstars.staging import group_dir, staged_file, write_group_record, write_staged

    started = time.perf_counter()
    plan = plan_group(manifest, config, group)
    log.info("build group=%d planned: sites=%d items=%d in %.2fs", group, len(plan.sites),
             sum(len(v) for v in plan.items.values()), time.perf_counter() - started)
    # A rerun starts clean: a killed job's staged files are not mixed with the new ones.
    for stale in group_dir(staging, group).glob("*"):
        stale.unlink()
    sensors = sensors_of(config)
    records: list[dict[str, Any]] = []
    for head, tiles, reason, tried, dropped_by in _acquired_sites(plan.sites, plan.items, config, f"group {group}"):
        sample = {name: _empty_buffers(sensor, 1, config) for name, sensor in sensors.items()}
        _store_site(sample, records, 0, head.site_id, head.split, tiles, reason, tried, config, dropped_by,
                    head.region)
        write_staged(staged_file(staging, group, head.site_id), sample, records[-1])
    seconds = time.perf_counter() - started
    dropped = sum(r["status"] != "ok" for r in records)
    log.info("build group=%d sites=%d dropped=%d seconds=%.1f", group, len(records), dropped, seconds)
    record = {"group": group, "sites": [r["site_id"] for r in records], "dropped": dropped,
              "seconds": round(seconds, 2)}
    write_group_record(staging, group, record)
    return record


def _unstage(buffers: dict, records: list, plan: PartPlan, manifest: Manifest, config: Mapping[str, Any],
             staging: Path) -> None:
    """Fill a part's buffers and records from its sites' staged samples."""
    from xstars.staging import GROUP_RECORD, group_dir, locality_groups, read_staged, staged_file

    per_group = int(config["build"]["sites_per_group"])
    group_of = {sample: g for g, samples in enumerate(locality_groups(manifest.site_cells(), per_group))
                for sample in samples}
    for offset, rows in enumerate(plan.sites):
        site_id, group = next(iter(rows.values())).site_id, group_of[plan.first + offset]
        path = staged_file(staging, group, site_id)
        if not path.exists():
            done = (group_dir(staging, group) / GROUP_RECORD).exists()
            raise DataError(f"{path}: site {site_id} (sample {plan.first + offset}) of part {plan.part} was not "
                            f"staged by group {group} ({'which finished without it' if done else 'not run or not finished'}); "
                            f"run `xstars build group --group {group}` (rule build_group) again")
        sample, record = read_staged(path)
        if record["site_id"] != site_id or set(sample) != set(buffers):
            raise DataError(f"{path}: staged for site {record['site_id']} with sensors {sorted(sample)}, "
                            f"part {plan.part} expects site {site_id} with {sorted(buffers)}")
        for sensor, named in buffers.items():
            for name, values in named.items():
                values[offset] = sample[sensor][name][0]
        records.append(record)


def _acquired_sites(sites: Sequence[Mapping[str, ManifestRow]], items: Mapping[str, Mapping[str, Any]],
                    config: Mapping[str, Any], desc: str):
    """Read every (site, sensor) tile of ``sites`` and yield, site by site in the given order,
    ``(head row, tiles by sensor, drop reason or None, fallbacks tried, dropped_by)``.

    Reading is latency-bound (HTTP ranges, WMS renders): the tiles are fetched by a pool of
    ``build.read_threads`` threads, as many sites ahead as there are threads; sites come out in
    order, so the result does not depend on which read finished first, and memory is bounded by
    the sites in flight, not by how many are read."""
    from collections import deque

    from tqdm import tqdm

    from xstars.remote import WmsClient

    sensors = sensors_of(config)
    threads = int(config["build"]["read_threads"])
    # One client per WMS, shared by the threads: its rate limit holds for the whole job.
    clients = {s.catalog_name: WmsClient(s.catalog_cfg, config["http"]) for s in sensors.values()
               if s.kind == "wms_layers"}

    def submit(pool: ThreadPoolExecutor, rows: Mapping[str, ManifestRow]) -> dict:
        if any(row.status != "ok" for row in rows.values()):
            return {}  # dropped by the catalog: nothing to read
        return {name: pool.submit(_first_usable, sensor, [items[name][i] for i in rows[name].item_ids],
                                  rows[name].bounds, config, clients.get(sensor.catalog_name))
                for name, sensor in sensors.items()}

    upcoming = iter(sites)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        in_flight = deque((rows, submit(pool, rows)) for rows in itertools.islice(upcoming, max(2, threads)))
        for _ in tqdm(range(len(sites)), desc=desc, unit="site", leave=False):
            rows, futures = in_flight.popleft()
            following = next(upcoming, None)
            if following is not None:
                in_flight.append((following, submit(pool, following)))
            head = next(iter(rows.values()))
            tiles: dict[str, Any] = {}
            reason, tried, dropped_by = head.drop_reason, {}, "build"
            if reason is not None:  # dropped by the catalog: stored with its reason, nothing read
                dropped_by = "catalog"
            for name in sensors if reason is None else ():
                tile, why, tried[name] = futures[name].result()
                if tile is None:
                    reason = reason or why
                else:
                    tiles[name] = tile
            yield head, tiles, reason, tried, dropped_by


@dataclass(frozen=True)
class PartPlan:
    """What a build part reads, known before its first request: its samples ``first:last``, each
    site's manifest rows by sensor, and the items they name (parsed once, by sensor and id)."""

    part: int
    first: int
    last: int
    sites: list[dict[str, ManifestRow]]
    items: dict[str, dict[str, dict[str, Any]]]


def plan_part(manifest: Manifest, config: Mapping[str, Any], part: int, with_items: bool = True) -> PartPlan:
    """The part's rows (only its row groups of the manifest are decoded) and the items they name
    (only the row groups of the items files holding them; none when ``with_items`` is false)."""
    per_shard = int(config["build"]["samples_per_shard"])
    if not 0 <= part < n_parts(manifest.n_sites, per_shard):
        raise DataError(f"part {part} is not in 0..{n_parts(manifest.n_sites, per_shard) - 1}")
    first = part * per_shard
    samples = range(first, min(first + per_shard, manifest.n_sites))
    sites, items = _sites_and_items(manifest, config, samples, with_items)
    return PartPlan(part, first, first + len(sites), sites, items)


@dataclass(frozen=True)
class GroupPlan:
    """What a locality group reads (:mod:`xstars.staging`): its samples in reading order, each
    site's rows by sensor, and the items they name."""

    group: int
    samples: list[int]
    sites: list[dict[str, ManifestRow]]
    items: dict[str, dict[str, dict[str, Any]]]


def plan_group(manifest: Manifest, config: Mapping[str, Any], group: int) -> GroupPlan:
    """The group's sites (from every site's cell, three columns of the manifest), their rows
    (only the row groups holding them are decoded) and the items they name."""
    from xstars.staging import locality_groups

    per_group = int(config["build"]["sites_per_group"])
    groups = locality_groups(manifest.site_cells(), per_group)
    if not 0 <= group < len(groups):
        raise DataError(f"group {group} is not in 0..{len(groups) - 1} (build.sites_per_group = {per_group})")
    sites, items = _sites_and_items(manifest, config, groups[group])
    return GroupPlan(group, groups[group], sites, items)


def _sites_and_items(manifest: Manifest, config: Mapping[str, Any], samples: Sequence[int],
                     with_items: bool = True) -> tuple[list[dict[str, ManifestRow]], dict[str, dict[str, dict]]]:
    """The rows of the sites at ``samples`` by sensor, and the items the kept ones name."""
    sites = [{row.sensor: row for row in rows} for rows in manifest.sites(samples)]
    sensors = sensors_of(config)
    for rows in sites:
        if set(rows) != set(sensors):
            raise DataError(f"{manifest.path}: site {next(iter(rows.values())).site_id} has rows for "
                            f"{sorted(rows)}, the config's sensors are {sorted(sensors)}")
    wanted = {name: sorted({i for rows in sites if all(r.status == "ok" for r in rows.values())
                            for i in rows[name].item_ids}) for name in sensors} if with_items else {}
    items = {name: manifest.items(name).get(ids) if ids else {} for name, ids in wanted.items()}
    return sites, items


def _store_site(buffers: dict, records: list, offset: int, site_id: str, split: str, tiles: dict,
                reason: DropReason | None, tried: dict, config: Mapping[str, Any], dropped_by: str = "build",
                region: str = "") -> None:
    """Co-register one site's tiles and put them, with their metadata, at ``offset`` of the buffers.

    With a ``reason``, the site is stored as dropped (by the ``catalog``, or at ``build`` time)."""
    from xstars.coregister import coregister_site

    shifts = coregister_site(tiles, config) if not reason else {}
    for sensor, b in buffers.items():
        b["site_id"][offset], b["split"][offset], b["region"][offset] = site_id, split, region
        b["status"][offset] = f"dropped: {reason.text}" if reason else "ok"
        tile = tiles.get(sensor)
        if tile is None or reason:
            continue
        b["data"][offset] = tile.sensor.encoding.pack(tile.data)
        b["valid"][offset] = tile.valid
        b["date"][offset] = _item_date(tile.item)
        b["item_id"][offset] = tile.item["id"]
        b["transform"][offset] = tile.grid.transform.to_gdal()
        b["cloud_fraction"][offset] = tile.invalid_fraction
        record = shifts.get(sensor)
        if record is not None:
            b["shift_x_m"][offset], b["shift_y_m"][offset] = record.dx_m, record.dy_m
            b["shift_confidence"][offset] = record.confidence
            b["shift_applied"][offset] = record.applied
            b["shift_flag"][offset] = record.flag
    records.append({"site_id": site_id, "split": split, "status": "dropped" if reason else "ok",
                    "reason": reason.text if reason else "", "reason_code": reason.code if reason else "",
                    "reason_sensor": reason.sensor if reason else "", "dropped_by": dropped_by if reason else "",
                    "items": {s: t.item["id"] for s, t in tiles.items()}, "fallbacks_tried": tried,
                    "shifts": {s: vars(r) for s, r in shifts.items()}})


def _shard_file(path: Path, sensor: str, name: str, part: int, ndim: int) -> Path:
    """The file of part ``part``'s shard of an array (local store, default chunk key encoding)."""
    return path.joinpath(sensor, name, "c", str(part), *(["0"] * (ndim - 1)))


def _first_usable(sensor: Sensor, candidates: Sequence[Mapping[str, Any]], bounds, config: Mapping[str, Any],
                  wms=None):
    """The chosen scene, or the first fallback, whose tile is readable and clear enough:
    (tile, None, problems) or (None, the DropReason, problems)."""
    from xstars.acquire import acquire_tile

    problems = []
    for item in candidates:
        try:
            tile = acquire_tile(sensor, item, bounds, config, wms)
        except ServiceError as err:
            problems.append(f"{item['id']}: {err}")
            continue
        if sensor.eligible(tile.invalid_fraction, float(config["catalog"]["max_invalid_fraction"])):
            return tile, None, len(problems)
        problems.append(f"{item['id']}: {tile.invalid_fraction:.2f} of the footprint invalid")
    text = f"{sensor.name}: no usable scene among {len(candidates)} ({'; '.join(problems)[:300]})"
    return None, DropReason(sensor.name, "no_usable_scene", text), len(problems)


def _empty_buffers(sensor: Sensor, count: int, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    size = sensor.pixels(config["sites"]["footprint_m"])
    bands = len(sensor.bands)
    dtype = np.dtype(sensor.encoding.dtype)
    buffers: dict[str, np.ndarray] = {
        "data": np.zeros((count, bands, size, size), dtype=dtype),
        "valid": np.zeros((count, size, size), dtype=np.uint8),
        "transform": np.full((count, 6), np.nan),
        "shift_applied": np.zeros(count, dtype=np.uint8),
    }
    for name in PER_SAMPLE_STRINGS:
        buffers[name] = np.array([""] * count, dtype=object)
    for name in PER_SAMPLE_FLOATS:
        buffers[name] = np.full(count, np.nan, dtype=np.float32)
    return buffers


def _item_date(item: Mapping[str, Any]) -> str:
    from xstars.items import item_datetime

    return item_datetime(item).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_part_record(record: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def finalize(path: Path, manifest: Manifest, part_records: Sequence[Mapping[str, Any]],
             config: Mapping[str, Any]) -> dict:
    """Check completeness, add normalisation statistics (train split), consolidate metadata.

    Every site of the manifest must be either in the store (ok or dropped at build time, with
    its reason) or listed as dropped by the catalog; DataError names what is missing.
    """
    import zarr

    root = open_store(path, mode="r+")
    n = int(root.attrs["xstars"]["samples"])
    covered = sorted(i for r in part_records for i in range(r["first"], r["last"]))
    if covered != list(range(n)):
        missing = sorted(set(range(n)) - set(covered))
        raise DataError(f"{path}: samples {missing[:10]} were written by no part (parts missing?)")
    stored = {rec["site_id"]: rec for r in part_records for rec in r["records"]}
    # The manifest's sites and the catalog's drops, a row group at a time (two columns).
    manifest_sites: set[str] = set()
    catalog_dropped: set[str] = set()
    for table in manifest.tables(["site_id", "status"]):
        for site_id, status in zip(table.column("site_id").to_pylist(), table.column("status").to_pylist(),
                                   strict=True):
            manifest_sites.add(site_id)
            if status != "ok":
                catalog_dropped.add(site_id)
    missing = manifest_sites - set(stored)
    if missing:
        raise DataError(f"{path}: sites {sorted(missing)[:10]} of the manifest are not in the store")
    kept_anyway = sorted(s for s in catalog_dropped if stored[s]["status"] == "ok")
    if kept_anyway:
        raise DataError(f"{path}: sites {kept_anyway[:10]} were dropped by the catalog but are stored as ok")
    stats = {}
    recorded_sums = all("statistics" in r for r in part_records)
    for sensor in image_sensors(config):
        group = root[sensor]
        if recorded_sums:
            stats[sensor] = _combine_statistics([r["statistics"][sensor] for r in
                                                 sorted(part_records, key=lambda r: r["part"])])
        else:  # parts recorded before they kept their sums: read the training split back
            split = group["split"][:]
            status = group["status"][:]
            stats[sensor] = _band_statistics(group, np.nonzero((split == "train") & (status == "ok"))[0])
        group.attrs["normalization"] = stats[sensor]
    dropped: dict[str, int] = {}
    for rec in stored.values():
        if rec["status"] != "ok":
            key = f"{rec['reason_sensor']}: {rec['dropped_by']}"
            dropped[key] = dropped.get(key, 0) + 1
    summary = {"samples": n, "kept": sum(r["status"] == "ok" for r in stored.values()),
               "dropped_by_reason": dict(sorted(dropped.items())), "normalization": stats}
    # Shard checksums recorded at build time: `xstars verify` recomputes them.
    checksums = {str(r["part"]): r.get("checksums", {}) for r in sorted(part_records, key=lambda r: r["part"])}
    root.attrs["xstars"] = {**root.attrs["xstars"], "summary": {k: v for k, v in summary.items() if k != "normalization"},
                            "shard_sha256": checksums}
    zarr.consolidate_metadata(str(path))
    return summary


def _partial_statistics(buffers: Mapping[str, np.ndarray], scale: float) -> dict[str, Any]:
    """The sums of a part's kept training samples, as stored (after packing), from its buffers."""
    keep = np.nonzero((buffers["split"] == "train") & (buffers["status"] == "ok"))[0]
    return _sums(((buffers["data"][k], buffers["valid"][k]) for k in keep), scale, buffers["data"].shape[1])


def _sums(tiles: Iterable[tuple[np.ndarray, np.ndarray]], scale: float, bands: int) -> dict[str, Any]:
    """Pixel count, per-band sum and sum of squares (physical units, float64) of the valid pixels
    of ``(data [band, y, x], valid [y, x])`` tiles, taken one at a time."""
    total, total_sq, count = np.zeros(bands), np.zeros(bands), 0
    for data, valid in tiles:
        values = data[:, valid.astype(bool)].astype(np.float64) * float(scale)
        total += values.sum(axis=1)
        total_sq += (values**2).sum(axis=1)
        count += values.shape[1]
    return {"pixels": int(count), "sum": total.tolist(), "sum_sq": total_sq.tolist()}


def _combine_statistics(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-band mean and standard deviation from the parts' sums, added in part order."""
    total = np.sum([p["sum"] for p in parts], axis=0)
    total_sq = np.sum([p["sum_sq"] for p in parts], axis=0)
    count = sum(int(p["pixels"]) for p in parts)
    if count == 0:
        return {"split": "train", "pixels": 0, "mean": [None] * len(total), "std": [None] * len(total)}
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"split": "train", "pixels": int(count), "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std]}


def _band_statistics(group, samples: Sequence[int]) -> dict[str, Any]:
    """Per-band mean and standard deviation of the valid pixels of ``samples``, read from the store
    one sample at a time (memory independent of the number of sites)."""
    tiles = ((group["data"][i], group["valid"][i]) for i in samples)
    sums = _sums(tiles, group["data"].attrs.get("scale_factor", 1.0), group["band"].shape[0])
    return _combine_statistics([sums])


def georeferenced(group, sample: int):
    """One sample of a group opened with ``xarray.open_zarr(path, group=...)``, georeferenced.

    Samples lie at different places, so the store keeps one ``transform`` per sample rather than
    shared x/y coordinates; this gives the sample's ``data`` with its own x/y pixel-centre
    coordinates and CRS, ready for rioxarray (``.rio.transform()``, ``.rio.to_raster()``).
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    from affine import Affine

    one = group.isel(sample=sample)
    transform = Affine.from_gdal(*[float(v) for v in one["transform"].values])
    height, width = one.sizes["y"], one.sizes["x"]
    xs = transform.c + transform.a * (np.arange(width) + 0.5)
    ys = transform.f + transform.e * (np.arange(height) + 0.5)
    data = one["data"].assign_coords(x=xs, y=ys)
    return data.rio.write_crs(group["spatial_ref"].attrs["crs_wkt"]).rio.write_transform(transform)
