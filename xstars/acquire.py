"""Acquire: read only the pixels a site needs from remote rasters, signed right before the read.

Assets are Cloud-Optimized GeoTIFFs behind HTTP (Planetary Computer blob storage, or the demo
world's file server): GDAL's ``/vsicurl/`` fetches just the blocks that intersect the window a site needs, which is
then resampled in memory onto the site's grid.

Signed URLs (SAS tokens) exist only inside :func:`read_source`: an href is signed immediately
before it is opened, re-signed with a fresh token when the server answers 403, and every error
message is passed through :func:`redact` so that no token reaches a log, an exception or a file.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
import rasterio
import requests
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds
from urllib3 import Retry

from xstars import items as stac_items
from xstars.errors import ServiceError

log = logging.getLogger(__name__)

#: Retried HTTP statuses (throttling and gateway errors of the Planetary Computer and the WMS).
RETRY_STATUSES = (429, 500, 502, 503, 504)

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


@dataclass(frozen=True)
class SourceWindow:
    """Pixels read from a raster in its own grid: the part of it that a site needs."""

    data: np.ndarray  # (bands, rows, cols)
    transform: Affine
    crs: str

    def warp(self, grid: Grid, resampling: Resampling = Resampling.nearest,
             shift_m: tuple[float, float] = (0.0, 0.0), coverage: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Resample onto ``grid``: (data (bands, h, w), covered (h, w) bool).

        ``shift_m`` = (dx, dy) in metres (dy northwards) is a known displacement of the source
        content: it is corrected by moving the source's georeferencing back by that much.
        ``covered`` is False where the grid falls outside the source window (all True without
        ``coverage``, for bands whose no-data value already tells it: a second warp saved).
        """
        out = np.zeros((self.data.shape[0], grid.height, grid.width), dtype=self.data.dtype)
        if self.data.size == 0:
            return out, np.zeros((grid.height, grid.width), dtype=bool)
        dx, dy = shift_m
        transform = Affine.translation(-dx, -dy) * self.transform
        reproject(self.data, out, src_transform=transform, src_crs=self.crs, dst_transform=grid.transform,
                  dst_crs=grid.crs, resampling=resampling)
        if not coverage:
            return out, np.ones((grid.height, grid.width), dtype=bool)
        covered = np.zeros((grid.height, grid.width), dtype=np.uint8)
        reproject(np.ones(self.data.shape[1:], dtype=np.uint8), covered, src_transform=transform, src_crs=self.crs,
                  dst_transform=grid.transform, dst_crs=grid.crs, resampling=Resampling.nearest, dst_nodata=0)
        return out, covered.astype(bool)


def read_on_grid(
    href: str,
    grid: Grid,
    *,
    stac_cfg: Mapping[str, Any],
    what: str,
    indexes: Sequence[int] | None = None,
    resampling: Resampling = Resampling.nearest,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an asset resampled onto ``grid``: (data (bands, h, w), covered (h, w) bool)."""
    return read_source(href, grid, stac_cfg=stac_cfg, what=what, indexes=indexes).warp(grid, resampling)


def read_source(
    href: str,
    grid: Grid,
    *,
    stac_cfg: Mapping[str, Any],
    what: str,
    indexes: Sequence[int] | None = None,
    margin_px: int = 2,
) -> SourceWindow:
    """Read the window of an asset that covers ``grid`` (plus ``margin_px`` source pixels).

    Only the blocks of the COG intersecting that window are fetched. The window is read with a
    plain ``read`` rather than through a WarpedVRT: GDAL's warper turns a failed block read (a
    truncated HTTP answer) into no-data with only a warning, while a direct read raises, and
    is retried. Retries up to ``stac_cfg['max_retries']`` times with exponential backoff,
    refetching (GDAL caches what it fetched, a truncated answer included); on 403 the href is
    re-signed with a fresh token. ``what`` names the read in errors (item id and asset key).
    A grid outside the raster gives an empty (0-pixel) window.
    """
    attempts = int(stac_cfg["max_retries"]) + 1
    fresh = False
    for attempt in range(attempts):
        url = sign_href(href, stac_cfg["signing"], fresh=fresh)
        options = gdal_options(stac_cfg)
        if attempt > 0:
            options["CPL_VSIL_CURL_NON_CACHED"] = f"/vsicurl/{url}"
        try:
            with rasterio.Env(**options), rasterio.open(url) as src:
                if src.crs is None or src.transform.is_identity:
                    # GDAL ignores a GeoTIFF tag it could not read (a truncated answer) with a
                    # warning only: a header without georeferencing is a failed read.
                    raise RasterioIOError(f"no georeferencing in the header of {redact(href)} (partial read?)")
                bands = list(indexes or range(1, src.count + 1))
                window = _source_window(src, grid, margin_px)
                if window is None:  # the grid does not touch the raster
                    window = Window(0, 0, 0, 0)
                    data = np.zeros((len(bands), 0, 0), dtype=src.dtypes[bands[0] - 1])
                else:
                    data = src.read(bands, window=window)
                return SourceWindow(data, src.window_transform(window), src.crs.to_string())
        except RasterioIOError as err:
            message = redact(str(err))
            fresh = "403" in message
            if attempt + 1 == attempts or "404" in message:  # a missing file stays missing
                raise ServiceError(f"reading {what} from {redact(href)} failed after {attempt + 1} attempt(s): "
                                   f"{message}") from None
            delay = float(stac_cfg["backoff_s"]) * 2**attempt
            log.warning("read %s failed (%s), retry %d/%d in %.1fs", what, message, attempt + 1,
                        attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _source_window(src, grid: Grid, margin_px: int) -> Window | None:
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


# =================================================================================== IGN WMS


@dataclass(frozen=True)
class WmsLayer:
    name: str
    bounds_l93: tuple[float, float, float, float] | None


class WmsClient:
    """A minimal WMS 1.3.0 client: GetCapabilities and GetMap with retries and a rate limit."""

    def __init__(self, ign_cfg: Mapping[str, Any], stac_cfg: Mapping[str, Any]) -> None:
        self.url = ign_cfg["wms_url"]
        self.cfg = ign_cfg
        self.timeout = float(stac_cfg["timeout_s"])
        self.session = requests.Session()
        retry = Retry(total=int(stac_cfg["max_retries"]), backoff_factor=float(stac_cfg["backoff_s"]),
                      status_forcelist=RETRY_STATUSES, respect_retry_after_header=True, raise_on_status=False)
        adapter = requests.adapters.HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # The service's limit is shared by every job that may run at once (the workflow lets at
        # most max_concurrent_jobs of them query it: resource ign_wms_jobs), so each takes its share.
        self.min_interval_s = float(ign_cfg["max_concurrent_jobs"]) / float(ign_cfg["max_requests_per_s"])
        self._next_slot = 0.0
        self._lock = threading.Lock()  # one client is shared by a build job's read threads

    def get(self, params: Mapping[str, str], what: str, url: str | None = None):
        """GET on the WMS (or on ``url``: a manifest's request keeps the endpoint it was made for)."""
        url = url or self.url
        with self._lock:  # requests of this job start at least min_interval_s apart
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self.min_interval_s
        if slot > now:
            time.sleep(slot - now)
        try:
            response = self.session.get(url, params=params, timeout=self.timeout)
        except requests.RequestException as err:
            raise ServiceError(f"WMS {url} is unreachable ({what}): {redact(str(err))[:300]}") from None
        content_type = response.headers.get("Content-Type", "")
        # A WMS may answer an error with status 200 and an XML exception report.
        if response.status_code != 200 or ("xml" in content_type and params.get("REQUEST") == "GetMap"):
            raise ServiceError(f"{what} at {url}: HTTP {response.status_code} {_exception_text(response)}")
        return response

    def layers(self) -> dict[str, WmsLayer]:
        """Layers of GetCapabilities with their EPSG:2154 bounding box when declared."""
        import xml.etree.ElementTree as ET

        response = self.get({"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetCapabilities"},
                            "GetCapabilities")
        try:
            root = ET.fromstring(response.content)
        except ET.ParseError as err:
            raise ServiceError(f"GetCapabilities at {self.url} is not XML: {err}") from None
        ns = {"w": "http://www.opengis.net/wms"}
        out = {}
        for layer in root.iter("{http://www.opengis.net/wms}Layer"):
            name = layer.findtext("w:Name", namespaces=ns)
            if not name:
                continue
            bounds = None
            for bbox in layer.findall("w:BoundingBox", ns):
                if bbox.get("CRS") == "EPSG:2154":
                    bounds = tuple(float(bbox.get(k)) for k in ("minx", "miny", "maxx", "maxy"))
            out[name] = WmsLayer(name, bounds)
        return out

    def getmap_params(self, layer: str, bounds: Sequence[float], width: int, height: int) -> dict[str, str]:
        return {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": layer, "STYLES": "",
                "CRS": "EPSG:2154", "BBOX": ",".join(f"{v:.2f}" for v in bounds), "WIDTH": str(width),
                "HEIGHT": str(height), "FORMAT": self.cfg["format"], "TRANSPARENT": "TRUE"}

    def getmap_url(self, layer: str, bounds: Sequence[float], width: int, height: int) -> str:
        return f"{self.url}?{urlencode(self.getmap_params(layer, bounds, width, height))}"

    def image(self, params: Mapping[str, str], what: str, url: str | None = None) -> np.ndarray:
        """A GetMap answer decoded: (bands, height, width) uint8."""
        response = self.get(params, what, url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a PNG carries no georeferencing
            with MemoryFile(response.content) as memfile, memfile.open() as image:
                return image.read()

    def nodata_fraction(self, layer: str, bounds: Sequence[float], size_px: int = 16) -> float:
        """Fraction of a small GetMap thumbnail of ``bounds`` that is empty (all zero or transparent)."""
        pixels = self.image(self.getmap_params(layer, bounds, size_px, size_px), f"GetMap {layer}")
        empty = (pixels[:3] == 0).all(axis=0)
        if pixels.shape[0] == 4:
            empty |= pixels[3] == 0
        return round(float(empty.mean()), 6)


def _exception_text(response) -> str:
    text = response.text[:400] if "xml" in response.headers.get("Content-Type", "") else ""
    return redact(" ".join(text.split()))


# ============================================================================ one site's tiles


#: Landsat C2 L2 surface reflectance constants (USGS), used when an asset has no raster:bands.
LANDSAT_SR_SCALE, LANDSAT_SR_OFFSET = 2.75e-5, -0.2


@dataclass
class SensorTile:
    """One sensor's pixels on a site's grid, in physical units, with what they came from.

    ``sources`` keeps the windows read (with a margin), so that co-registration can resample
    them again with a corrected georeferencing instead of reading twice.
    """

    sensor: str
    item: dict[str, Any]
    grid: Grid
    sources: dict[str, SourceWindow]
    data: np.ndarray  # (bands, h, w): reflectance (float32) or classes (uint8)
    valid: np.ndarray  # (h, w) bool
    shift_m: tuple[float, float] = (0.0, 0.0)

    @property
    def invalid_fraction(self) -> float:
        return float(1.0 - self.valid.mean())


def site_grid(bounds: Sequence[float], gsd_m: float, crs: str, margin_m: float = 0.0) -> Grid:
    """The grid of a site's footprint (optionally grown by ``margin_m``) at ``gsd_m``."""
    xmin, ymin, xmax, ymax = bounds
    return Grid.from_bounds((xmin - margin_m, ymin - margin_m, xmax + margin_m, ymax + margin_m), gsd_m, crs)


def read_sources(sensor: str, item: Mapping[str, Any], grid: Grid, config: Mapping[str, Any],
                 margin_m: float, wms: WmsClient | None = None) -> dict[str, SourceWindow]:
    """Read every asset a sensor needs over ``grid`` grown by ``margin_m``, keyed by asset.

    ``wms``: the client GetMaps go through (share one between threads, for its rate limit).
    """
    stac_cfg = config["stac"]
    if sensor == "ign":
        # At full resolution only the footprint (and 2 pixels for the resampling kernel); the
        # margin co-registration needs is asked for at the finest resolution of the other
        # sensors, which is all it is compared at: 4x fewer pixels for the WMS to render.
        edge = 2 * grid.transform.a
        wms = wms or WmsClient(config["ign"], stac_cfg)
        out = {key: read_wms(asset["href"], grid, edge, wms, what=f"{item['id']}/{key}")
               for key, asset in item["assets"].items()}
        if margin_m > 0:
            band = config["build"]["coregister_bands"]["ign"]
            key = "irc" if band == "NIR" else "rgb"
            context_gsd = min(float(config["sensors"][s]["gsd_m"]) for s in ("s2", "l8"))
            context_grid = site_grid(grid.bounds, context_gsd, grid.crs)
            out[f"{key}_context"] = read_wms(item["assets"][key]["href"], context_grid, margin_m, wms,
                                             what=f"{item['id']}/{key}_context")
        return out
    cfg = config["sensors"][sensor]
    keys = [cfg["asset"]] if sensor == "labels" else [*cfg["bands"], cfg["mask_asset"]]
    out = {}
    for key in keys:
        asset = item["assets"].get(key)
        if asset is None:
            raise ServiceError(f"item {item['id']!r} has no asset {key!r} (sensors.{sensor})")
        gsd = stac_items.asset_gsd_m(item, asset) or float(cfg["gsd_m"])
        margin_px = math.ceil(margin_m / gsd) + 2
        out[key] = read_source(asset["href"], grid, stac_cfg=stac_cfg, what=f"{item['id']}/{key}",
                               indexes=[1], margin_px=margin_px)
    return out


def read_wms(href: str, grid: Grid, margin_m: float, client: WmsClient, what: str) -> SourceWindow:
    """A GetMap request (the manifest's asset) redone over ``grid``'s bounds grown by ``margin_m``."""
    parts = urlsplit(href)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    xmin, ymin, xmax, ymax = grid.bounds
    gsd = grid.transform.a
    bounds = (xmin - margin_m, ymin - margin_m, xmax + margin_m, ymax + margin_m)
    width, height = round((bounds[2] - bounds[0]) / gsd), round((bounds[3] - bounds[1]) / gsd)
    params.update(BBOX=",".join(f"{v:.2f}" for v in bounds), WIDTH=str(width), HEIGHT=str(height), CRS=grid.crs)
    data = client.image(params, f"GetMap {what}", url=parts._replace(query="").geturl())
    # PNG with TRANSPARENT=TRUE may add an alpha band: keep the colour bands.
    return SourceWindow(data[:3] if data.shape[0] == 4 else data, Affine(gsd, 0.0, bounds[0], 0.0, -gsd, bounds[3]),
                        grid.crs)


def render(sensor: str, item: Mapping[str, Any], sources: Mapping[str, SourceWindow], grid: Grid,
           config: Mapping[str, Any], shift_m: tuple[float, float] = (0.0, 0.0),
           resampling: Resampling = Resampling.bilinear) -> tuple[np.ndarray, np.ndarray]:
    """A sensor's tile on ``grid`` in physical units, and its validity, from its source windows.

    Sentinel-2: reflectance = (DN + offset) / 10000, the offset decided by the item's processing
    baseline. Landsat: DN * scale + offset from the asset's ``raster:bands`` (USGS constants
    otherwise). IGN: digital numbers / 255. Labels: class codes, nearest neighbour.
    Invalid: outside the scene, DN 0 (no data), or flagged by the quality mask.
    """
    if sensor == "labels":
        key = config["sensors"]["labels"]["asset"]
        classes, covered = sources[key].warp(grid, Resampling.nearest, shift_m)
        return classes.astype(np.uint8), covered & (classes[0] != 0)
    if sensor == "ign":
        rgb, covered = sources["rgb"].warp(grid, resampling, shift_m)
        bands = {"R": rgb[0], "G": rgb[1], "B": rgb[2]}
        if "irc" in sources:
            irc, covered_irc = sources["irc"].warp(grid, resampling, shift_m)
            bands["NIR"] = irc[0]
            covered &= covered_irc
        wanted = config["sensors"]["ign"]["bands"]
        data = np.stack([bands[b] for b in wanted]).astype(np.float32) / 255.0
        return data, covered & (rgb.max(axis=0) > 0)
    cfg = config["sensors"][sensor]
    mask, covered = sources[cfg["mask_asset"]].warp(grid, Resampling.nearest, shift_m)
    valid = covered & ~invalid_from_mask(mask[0], cfg)
    layers = []
    for key in cfg["bands"]:
        dn, _ = sources[key].warp(grid, resampling, shift_m, coverage=False)  # outside -> DN 0
        dn = dn[0].astype(np.float32)
        valid &= dn > 0
        if sensor == "s2":
            offset = stac_items.s2_offset_for_baseline(stac_items.processing_baseline(item))
            layers.append((dn + offset) / 10000.0)
        else:
            band = (item["assets"][key].get("raster:bands") or [{}])[0]
            layers.append(dn * float(band.get("scale", LANDSAT_SR_SCALE)) + float(band.get("offset", LANDSAT_SR_OFFSET)))
    return np.stack(layers).astype(np.float32), valid


def acquire_tile(sensor: str, item: Mapping[str, Any], bounds: Sequence[float], config: Mapping[str, Any],
                 wms: WmsClient | None = None) -> SensorTile:
    """Read and convert one sensor's tile for a site footprint ``bounds`` (sites CRS)."""
    gsd = float(config["sensors"][sensor]["gsd_m"])
    crs = config["sites"]["crs"]
    grid = site_grid(bounds, gsd, crs)
    margin_m = float(config["build"]["margin_m"])
    sources = read_sources(sensor, item, grid, config, margin_m, wms)
    data, valid = render(sensor, item, sources, grid, config)
    return SensorTile(sensor, dict(item), grid, sources, data, valid)
