"""Acquire: one sensor's tile of one site, from the manifest's item to physical units on a grid.

The path of a tile, top to bottom::

    item (manifest) ─ read_sources ─> windows in the source's own grid (with a margin)
                    ─ render ───────> values on the footprint grid, in physical units, + validity

:func:`read_sources` reads only the pixels the site needs, through the remote-raster layer
(:mod:`xstars.remote`: COG windows over HTTP, GetMaps), and keeps them: co-registration
(:mod:`xstars.coregister`) renders them again with a corrected georeferencing instead of reading
twice. What a band's digital numbers mean, and which pixels are valid, is the sensor's
(:mod:`xstars.sensors`); this module only asks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.enums import Resampling

from xstars import items as stac_items
from xstars.errors import ServiceError
from xstars.remote import Grid, SourceWindow, WmsClient, read_source, read_wms
from xstars.sensors import Sensor


@dataclass
class SensorTile:
    """One sensor's pixels on a site's grid, in physical units, with what they came from.

    ``sources`` keeps the windows read (with a margin), so that co-registration can resample
    them again with a corrected georeferencing instead of reading twice.
    """

    sensor: Sensor
    item: dict[str, Any]
    grid: Grid
    sources: dict[str, SourceWindow]
    data: np.ndarray  # (bands, h, w): physical values (float32) or classes (uint8)
    valid: np.ndarray  # (h, w) bool
    shift_m: tuple[float, float] = (0.0, 0.0)

    @property
    def invalid_fraction(self) -> float:
        return float(1.0 - self.valid.mean())


def site_grid(bounds: Sequence[float], gsd_m: float, crs: str, margin_m: float = 0.0) -> Grid:
    """The grid of a site's footprint (optionally grown by ``margin_m``) at ``gsd_m``."""
    xmin, ymin, xmax, ymax = bounds
    return Grid.from_bounds((xmin - margin_m, ymin - margin_m, xmax + margin_m, ymax + margin_m), gsd_m, crs)


def context_key(layer_key: str) -> str:
    """Source key of a WMS layer's coarse co-registration context (its margin)."""
    return f"{layer_key}_context"


def context_gsd_m(sensor: Sensor, config: Mapping[str, Any]) -> float:
    """Resolution a WMS sensor's co-registration margin is read at.

    The margin serves only the comparison with the other image sensors, made at the coarser
    of each pair's resolutions: the reference reads it at the finest resolution of the others
    (4x fewer pixels for the WMS to render than at 1 m with Sentinel-2's 10 m), any other
    sensor at its own resolution or the reference's, whichever is coarser.
    """
    from xstars.sensors import image_sensors

    others = [s.gsd_m for name, s in image_sensors(config).items() if name != sensor.name]
    reference = config["build"]["coregister_reference"]
    if sensor.name == reference:
        return max(min(others, default=sensor.gsd_m), sensor.gsd_m)
    return max(sensor.gsd_m, image_sensors(config)[reference].gsd_m)


def read_sources(sensor: Sensor, item: Mapping[str, Any], grid: Grid, config: Mapping[str, Any],
                 margin_m: float, wms: WmsClient | None = None) -> dict[str, SourceWindow]:
    """Read every asset a sensor needs over ``grid`` grown by ``margin_m``, keyed by asset.

    ``wms``: the client GetMaps go through (share one between threads, for its rate limit).
    """
    http_cfg = config["http"]
    if sensor.kind == "wms_layers":
        # At full resolution only the footprint (and 2 pixels for the resampling kernel); the
        # margin co-registration needs is asked for at the resolution it is compared at.
        edge = 2 * grid.transform.a
        wms = wms or WmsClient(sensor.catalog_cfg, http_cfg)
        out = {key: read_wms(asset["href"], grid, edge, wms, what=f"{item['id']}/{key}")
               for key, asset in item["assets"].items()}
        if margin_m > 0:
            key = _layer_of(sensor, sensor.coregister_band)
            context_grid = site_grid(grid.bounds, context_gsd_m(sensor, config), grid.crs)
            out[context_key(key)] = read_wms(item["assets"][key]["href"], context_grid, margin_m, wms,
                                             what=f"{item['id']}/{context_key(key)}")
        return out
    if "xstars:mosaic" in item:  # class maps read together (catalog.mosaic_item), in their order
        return {f"{key}#{i}": source for i, member in enumerate(item["xstars:mosaic"])
                for key, source in read_sources(sensor, member, grid, config, margin_m, wms).items()}
    out = {}
    for key in sensor.assets():
        asset = item["assets"].get(key)
        if asset is None:
            raise ServiceError(f"item {item['id']!r} has no asset {key!r} (sensors.{sensor.name})")
        gsd = stac_items.asset_gsd_m(item, asset) or sensor.gsd_m
        margin_px = math.ceil(margin_m / gsd) + 2
        out[key] = read_source(asset["href"], grid, catalog_cfg=sensor.catalog_cfg, http_cfg=http_cfg,
                               what=f"{sensor.collection}/{item['id']}/{key}", indexes=[1], margin_px=margin_px)
    return out


def _layer_of(sensor: Sensor, band: str | None) -> str:
    """The layer (asset key) a WMS sensor takes ``band`` from."""
    for key, bands in sensor.layers_needed().items():
        if band in bands:
            return key
    raise ServiceError(f"sensors.{sensor.name}: band {band!r} comes from none of its layers")


def render(sensor: Sensor, item: Mapping[str, Any], sources: Mapping[str, SourceWindow], grid: Grid,
           shift_m: tuple[float, float] = (0.0, 0.0), resampling: Resampling = Resampling.bilinear,
           bands: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A sensor's tile on ``grid`` in physical units, and its validity, from its source windows.

    ``bands``: a subset of the sensor's bands (co-registration renders one). Labels are class
    codes, resampled nearest. Invalid: outside the source, a fill value (or fill colour), or
    flagged by the quality mask.
    """
    bands = list(bands or sensor.bands)
    if sensor.kind == "stac_labels":
        key = sensor.assets()[0]
        members = sorted((k for k in sources if k.startswith(f"{key}#")), key=lambda k: int(k.split("#")[1])) or [key]
        classes = np.zeros((1, grid.height, grid.width), dtype=np.uint8)
        labelled = np.zeros((grid.height, grid.width), dtype=bool)
        for member in members:  # a mosaic: the first map that labels a pixel labels it
            codes, covered = sources[member].warp(grid, Resampling.nearest, shift_m)
            new = covered & sensor.valid_pixels(codes[0]) & ~labelled
            classes[0][new] = codes[0][new]
            labelled |= new
        return classes, labelled
    if sensor.kind == "wms_layers":
        return _render_wms(sensor, sources, grid, shift_m, resampling, bands)
    mask, covered = sources[sensor.asset_key(sensor.mask_band)].warp(grid, Resampling.nearest, shift_m)
    valid = covered & ~sensor.invalid_from_mask(mask[0])
    layers = []
    for band in bands:
        dn, _ = sources[sensor.asset_key(band)].warp(grid, resampling, shift_m, coverage=False,  # outside -> fill
                                                     nodata=sensor.fill_value)
        dn = dn[0]
        valid &= sensor.valid_pixels(dn)
        layers.append(sensor.to_physical(dn.astype(np.float32), item, band))
    return np.stack(layers).astype(np.float32), valid


def _render_wms(sensor: Sensor, sources: Mapping[str, SourceWindow], grid: Grid, shift_m: tuple[float, float],
                resampling: Resampling, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each band from the first layer that has it; valid where every layer read has an image."""
    values: dict[str, np.ndarray] = {}
    valid = np.ones((grid.height, grid.width), dtype=bool)
    for key, needed in sensor.layers_needed().items():
        if not set(needed) & set(bands):
            continue
        image, covered = sources[key].warp(grid, resampling, shift_m)
        valid &= covered & ~sensor.empty_pixels(image, key)
        layer_bands = sensor.layer_bands(key)
        for band in needed:
            values[band] = image[layer_bands.index(band)]
    data = np.stack([sensor.to_physical(values[b].astype(np.float32), {}, b) for b in bands]).astype(np.float32)
    return data, valid


def acquire_tile(sensor: Sensor, item: Mapping[str, Any], bounds: Sequence[float], config: Mapping[str, Any],
                 wms: WmsClient | None = None) -> SensorTile:
    """Read and convert one sensor's tile for a site footprint ``bounds`` (sites CRS)."""
    grid = site_grid(bounds, sensor.gsd_m, config["sites"]["crs"])
    margin_m = float(config["build"]["margin_m"]) if sensor.is_image else 0.0
    sources = read_sources(sensor, item, grid, config, margin_m, wms)
    data, valid = render(sensor, item, sources, grid)
    return SensorTile(sensor, dict(item), grid, sources, data, valid)
