"""Acquire: read only the pixels a site needs from remote rasters, signed right before the read.

Assets are Cloud-Optimized GeoTIFFs behind HTTP (Planetary Computer blob storage, or the demo
world's file server): GDAL's ``/vsicurl/`` fetches just the blocks that intersect the window a site needs, which is
then resampled in memory onto the site's grid.

Signed URLs (SAS tokens) exist only inside :func:`read_on_grid`: an href is signed immediately
before it is opened, re-signed with a fresh token when the server answers 403, and every error
message is passed through :func:`redact` so that no token reaches a log, an exception or a file.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from xstars.errors import ServiceError

log = logging.getLogger(__name__)

_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the query string of every URL replaced by ``?<redacted>``."""
    return _QUERY.sub(r"\1?<redacted>", text)


class RedactingFilter(logging.Filter):
    """Strips URL query strings (SAS tokens) from log records, e.g. GDAL's HTTP warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(str(record.msg))
        if record.args:
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


# GDAL reports HTTP errors with the full URL through rasterio's logger: with a signed href that
# is a token in the log. Redacted at the source, for every handler.
for _name in ("rasterio._env", "rasterio._err", "rasterio"):
    logging.getLogger(_name).addFilter(RedactingFilter())


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: where a site's pixels are, in ``crs``."""

    crs: str
    transform: Affine
    width: int
    height: int

    @classmethod
    def from_bounds(cls, bounds: Sequence[float], gsd_m: float, crs: str) -> Grid:
        """The grid of ``gsd_m`` pixels whose outer edges are ``bounds`` (xmin, ymin, xmax, ymax)."""
        xmin, ymin, xmax, ymax = bounds
        width, height = round((xmax - xmin) / gsd_m), round((ymax - ymin) / gsd_m)
        if not math.isclose(width * gsd_m, xmax - xmin) or not math.isclose(height * gsd_m, ymax - ymin):
            raise ValueError(f"bounds {tuple(bounds)} are not a whole number of {gsd_m} m pixels")
        return cls(crs, Affine(gsd_m, 0.0, xmin, 0.0, -gsd_m, ymax), width, height)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)

    def window_of(self, bounds: Sequence[float]) -> tuple[slice, slice]:
        """(rows, cols) slices of the pixels of ``bounds`` (aligned on this grid)."""
        t = self.transform
        col0 = round((bounds[0] - t.c) / t.a)
        col1 = round((bounds[2] - t.c) / t.a)
        row0 = round((bounds[3] - t.f) / t.e)
        row1 = round((bounds[1] - t.f) / t.e)
        return slice(row0, row1), slice(col0, col1)


def gdal_options(stac_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """GDAL settings for reading COGs over HTTP: few requests, retries on 429/5xx."""
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MAX_RETRY": int(stac_cfg["max_retries"]),
        "GDAL_HTTP_RETRY_DELAY": float(stac_cfg["backoff_s"]),
        "GDAL_HTTP_TIMEOUT": int(stac_cfg["timeout_s"]),
        "VSI_CACHE": "TRUE",
    }


def sign_href(href: str, signing: str, *, fresh: bool = False) -> str:
    """The href to open: signed by the Planetary Computer SDK (a no-op on other hosts).

    ``fresh`` drops the SDK's token cache first (after a 403: the token expired).
    """
    if signing == "none":
        return href
    import planetary_computer

    if fresh:
        planetary_computer.sas.TOKEN_CACHE.clear()
    return planetary_computer.sign(href)


def read_on_grid(
    href: str,
    grid: Grid,
    *,
    stac_cfg: Mapping[str, Any],
    what: str,
    indexes: Sequence[int] | None = None,
    resampling: Resampling = Resampling.nearest,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an asset resampled onto ``grid``: (data (bands, h, w), covered (h, w) bool).

    Only the source window covering the grid (plus two source pixels for the resampling
    kernel) is read, then warped in memory. ``covered`` is False where the grid falls outside
    the raster, so that "outside the scene" is never mistaken for a valid zero.

    The window is read with a plain ``read`` rather than through a WarpedVRT: GDAL's warper
    turns a failed block read (a truncated HTTP answer) into no-data with only a warning,
    while a direct read raises, and is retried. Retries up to ``stac_cfg['max_retries']``
    times with exponential backoff; on 403 the href is re-signed with a fresh token.
    ``what`` names the read in errors (item id and asset key).
    """
    attempts = int(stac_cfg["max_retries"]) + 1
    fresh = False
    for attempt in range(attempts):
        url = sign_href(href, stac_cfg["signing"], fresh=fresh)
        options = gdal_options(stac_cfg)
        if attempt > 0:
            # GDAL caches what it fetched, a truncated answer included: fetch afresh.
            options["CPL_VSIL_CURL_NON_CACHED"] = f"/vsicurl/{url}"
        try:
            with rasterio.Env(**options), rasterio.open(url) as src:
                if src.crs is None or src.transform.is_identity:
                    # GDAL ignores a GeoTIFF tag it could not read (a truncated answer) with a
                    # warning only: a header without georeferencing is a failed read.
                    raise RasterioIOError(f"no georeferencing in the header of {redact(href)} (partial read?)")
                bands = list(indexes or range(1, src.count + 1))
                window = _source_window(src, grid)
                if window is None:  # the grid does not touch the raster
                    empty = np.zeros((len(bands), grid.height, grid.width), dtype=src.dtypes[bands[0] - 1])
                    return empty, np.zeros((grid.height, grid.width), dtype=bool)
                data = src.read(bands, window=window)
                src_transform, src_crs = src.window_transform(window), src.crs
            break
        except RasterioIOError as err:
            message = redact(str(err))
            fresh = "403" in message
            if attempt + 1 == attempts:
                raise ServiceError(f"reading {what} from {redact(href)} failed after {attempts} attempts: "
                                   f"{message}") from None
            delay = float(stac_cfg["backoff_s"]) * 2**attempt
            log.warning("read %s failed (%s), retry %d/%d in %.1fs", what, message, attempt + 1,
                        attempts - 1, delay)
            time.sleep(delay)
    out = np.zeros((data.shape[0], grid.height, grid.width), dtype=data.dtype)
    reproject(data, out, src_transform=src_transform, src_crs=src_crs, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=resampling)
    covered = np.zeros((grid.height, grid.width), dtype=np.uint8)
    reproject(np.ones(data.shape[1:], dtype=np.uint8), covered, src_transform=src_transform, src_crs=src_crs,
              dst_transform=grid.transform, dst_crs=grid.crs, resampling=Resampling.nearest, dst_nodata=0)
    return out, covered.astype(bool)


def _source_window(src, grid: Grid, margin_px: int = 2) -> Window | None:
    """The window of ``src`` covering ``grid`` plus a margin, clipped to the raster (None: outside)."""
    left, bottom, right, top = transform_bounds(grid.crs, src.crs, *grid.bounds, densify_pts=21)
    window = from_bounds(left, bottom, right, top, transform=src.transform)
    col0 = max(math.floor(window.col_off) - margin_px, 0)
    row0 = max(math.floor(window.row_off) - margin_px, 0)
    col1 = min(math.ceil(window.col_off + window.width) + margin_px, src.width)
    row1 = min(math.ceil(window.row_off + window.height) + margin_px, src.height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


def invalid_from_mask(mask: np.ndarray, sensor_cfg: Mapping[str, Any]) -> np.ndarray:
    """Pixels made invalid by a quality mask: class values (SCL) or set bits (qa_pixel)."""
    if "mask_invalid_classes" in sensor_cfg:
        return np.isin(mask, np.asarray(sensor_cfg["mask_invalid_classes"], dtype=mask.dtype))
    bits = 0
    for bit in sensor_cfg["mask_invalid_bits"]:
        bits |= 1 << int(bit)
    return (mask.astype(np.uint32) & bits) != 0
