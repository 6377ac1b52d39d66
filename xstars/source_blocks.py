"""What a build reads from each COG: the blocks its sites' windows touch.

A Cloud-Optimised GeoTIFF is fetched block by block: GDAL asks for the byte ranges of the whole
internal tiles a window touches. So a site costs every block, of every asset it needs, that its
footprint plus the co-registration margin touches: with real Sentinel-2 files (1024-px blocks,
10 km at 10 m) a 2.2 km footprint pays for 1 to 4 blocks of 10 km, and its neighbours pay for
the same blocks again unless they are read by the same process while GDAL still holds them.

This module says which blocks, from the items alone (``proj:transform``, ``proj:shape``) and the
files' block size, with the very window the build reads (:func:`xstars.remote.source_window`):

    part's rows + items ─ part_reads ─> {href: AssetRead(window, ...)} per site
                        ─ blocks_touched ─> {(href, block row, block col)}

The union of the blocks of every site is the *block-aligned minimum* of a build: what it must
fetch at least, each block once. ``bench/bench_io.py`` compares it with the bytes the build
really fetched, for parts in store order and for parts planned by what they share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from affine import Affine
from rasterio.windows import Window

from xstars import items as stac_items
from xstars.errors import DataError
from xstars.manifest import MOSAIC_KEY, ManifestRow
from xstars.remote import source_window
from xstars.sensors import Sensor


@dataclass(frozen=True)
class AssetRead:
    """One window of one asset a site reads (unsigned href; window in the asset's pixels)."""

    sensor: str
    href: str
    window: Window
    width: int  # the asset's size in pixels
    height: int


def asset_grid(item: Mapping[str, Any], asset: Mapping[str, Any]) -> tuple[Affine, int, int]:
    """An asset's pixel grid from its item: ``proj:transform`` and ``proj:shape`` of the asset,
    else of the item (the same for every asset)."""
    props = item.get("properties", {})
    transform = asset.get("proj:transform") or props.get("proj:transform")
    shape = asset.get("proj:shape") or props.get("proj:shape")
    if not transform or not shape:
        raise DataError(f"item {item.get('id')!r}: no proj:transform/proj:shape for asset {asset.get('href')!r}")
    return Affine(*transform[:6]), int(shape[1]), int(shape[0])


def asset_reads(sensor: Sensor, item: Mapping[str, Any], bounds: Sequence[float],
                config: Mapping[str, Any]) -> list[AssetRead]:
    """The windows the build reads for one site and sensor (:func:`xstars.acquire.acquire_tile`
    then :func:`xstars.acquire.read_sources`): every asset of a raster sensor, every member of a
    label mosaic. A WMS sensor reads no file (its GetMaps are counted apart)."""
    from xstars.acquire import site_grid

    if sensor.kind == "wms_layers":
        return []
    if MOSAIC_KEY in item:
        return [read for member in item[MOSAIC_KEY] for read in asset_reads(sensor, member, bounds, config)]
    grid = site_grid(bounds, sensor.gsd_m, config["sites"]["crs"])
    margin_m = float(config["build"]["margin_m"]) if sensor.is_image else 0.0
    crs = stac_items.item_crs(item)
    out = []
    for key in sensor.assets():
        asset = item["assets"][key]
        gsd = stac_items.asset_gsd_m(item, asset) or sensor.gsd_m
        transform, width, height = asset_grid(item, asset)
        window = source_window(transform, width, height, crs, grid, math.ceil(margin_m / gsd) + 2)
        if window is not None:
            out.append(AssetRead(sensor.name, asset["href"], window, width, height))
    return out


def part_reads(sites: Iterable[Mapping[str, ManifestRow]], items: Mapping[str, Mapping[str, Mapping[str, Any]]],
               sensors: Mapping[str, Sensor], config: Mapping[str, Any]) -> list[list[AssetRead]]:
    """The reads of each kept site of a part (its rows by sensor, the items they name: a
    :class:`xstars.store.PartPlan`), with the chosen scenes (a fallback is read only when the
    chosen scene proves unusable)."""
    out = []
    for rows in sites:
        if any(row.status != "ok" for row in rows.values()):
            continue
        out.append([read for name, row in rows.items()
                    for read in asset_reads(sensors[name], items[name][row.item_id], row.bounds, config)])
    return out


def blocks_touched(window: Window, block_height: int, block_width: int) -> list[tuple[int, int]]:
    """The (row, col) of every block of ``block_height`` x ``block_width`` pixels ``window`` touches."""
    rows = range(int(window.row_off) // block_height, (int(window.row_off) + int(window.height) - 1) // block_height + 1)
    cols = range(int(window.col_off) // block_width, (int(window.col_off) + int(window.width) - 1) // block_width + 1)
    return [(r, c) for r in rows for c in cols]
