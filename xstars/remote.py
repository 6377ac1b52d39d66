"""The remote-raster layer: every request xstars makes to a service goes through here.

Three kinds of services are read, with one set of rules for all of them:

* STAC APIs (searched by :mod:`xstars.catalog` through pystac-client, whose session is given
  :func:`http_retry`);
* Cloud-Optimized GeoTIFFs behind HTTP (Planetary Computer blob storage, Earth Search's S3
  bucket, the demo world's file server): :func:`read_source` reads only the window a grid needs,
  GDAL's ``/vsicurl/`` fetching just the blocks that intersect it (through ``http.proxy`` when
  one is configured: the demo world's fake blob storage is reached so);
* OGC WMS (the IGN Géoplateforme): :class:`WmsClient`, GetCapabilities (read with OWSLib,
  :func:`parse_capabilities`) and GetMap, paced to the service's rate limit and within its
  LayerLimit and MaxWidth/MaxHeight (:func:`read_wms` asks for a large window in tiles); the
  configured layers are checked against the capabilities (:func:`check_wms_sensor`).

The rules: single requests answered 429/5xx (or dropped) are retried by urllib3 with backoff,
honouring Retry-After (:func:`http_retry`); a request whose answer arrived broken, or a COG read
that failed after the open, is retried whole by :func:`with_retries` (the one retry loop);
hrefs are signed right before they are opened (:func:`sign_href`, its token request retried like
any other) and signed again on 403; and no SAS token ever leaves this module: every log record
of the process is redacted from the moment it is imported (:mod:`xstars.redaction`), and every
exception text that may hold a URL goes through :func:`redact`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
import rasterio
import requests
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds
from urllib3 import Retry

from xstars.errors import ConfigError, ServiceError
from xstars.redaction import install as install_redaction
from xstars.redaction import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Retried HTTP statuses (throttling and gateway errors of the Planetary Computer and the WMS).
RETRY_STATUSES = (429, 500, 502, 503, 504)

# Every text that may hold a signed href is redacted (xstars.redaction): log records of every
# logger (rasterio's and GDAL's included) from the moment this module is imported.
install_redaction()


# ================================================================================== retries


def http_retry(http_cfg: Mapping[str, Any], *, all_methods: bool = False) -> Retry:
    """urllib3's retry policy for one request: 429/5xx and dropped connections, with backoff,
    honouring Retry-After. ``all_methods``: POST too (STAC searches are read-only)."""
    return Retry(
        total=int(http_cfg["max_retries"]),
        backoff_factor=float(http_cfg["backoff_s"]),
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None if all_methods else Retry.DEFAULT_ALLOWED_METHODS,
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer reaches the caller, which names its status
    )


def with_retries(call: Callable[[int], T], *, what: str, http_cfg: Mapping[str, Any],
                 retryable: Callable[[Exception], bool], errors: tuple[type[Exception], ...]) -> T:
    """``call(attempt)``, retried whole with exponential backoff while it raises a retryable error.

    The one retry loop of xstars, for what urllib3 cannot retry: a STAC answer that arrived
    truncated, a COG block read that failed after the open. ``errors`` are the exceptions
    considered at all (others propagate); ``retryable(err)`` says whether one is worth another
    attempt. The final failure is a :class:`ServiceError` naming ``what``, its text redacted.
    """
    attempts = int(http_cfg["max_retries"]) + 1
    for attempt in range(attempts):
        try:
            return call(attempt)
        except errors as err:
            message = redact(str(err))[:500]
            if attempt + 1 == attempts or not retryable(err):
                status = getattr(err, "status_code", None) or getattr(getattr(err, "response", None), "status_code", None)
                detail = f"HTTP {status}: " if status else ""
                raise ServiceError(redact(f"{what} failed after {attempt + 1} attempt(s): {detail}{message}")) from None
            delay = float(http_cfg["backoff_s"]) * 2**attempt
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, message, attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ================================================================================== signing


def sign_href(href: str, signing: str, *, http_cfg: Mapping[str, Any], what: str, fresh: bool = False,
              token_url: str | None = None) -> str:
    """The href to open: signed by the Planetary Computer SDK (a no-op on other hosts).

    The SDK asks its token endpoint for one SAS token per storage container (``token_url``, the
    catalogue's, when given: :func:`use_token_endpoint`; else ``PC_SDK_SAS_URL``, default the
    Planetary Computer's; ``PC_SDK_SUBSCRIPTION_KEY`` optional) and caches it until 60 s
    before its expiry. That request is made like any other of xstars: its 429/5xx and dropped
    connections retried by urllib3 under the SDK with the ``http`` settings (not the SDK's own
    10 retries), an answer that arrived broken (truncated, not JSON, no token) asked again by
    :func:`with_retries`, and what still fails is a :class:`ServiceError` naming ``what`` (the
    collection, item and asset): the build falls back to the next scene, the CLI prints one
    line. ``fresh`` drops the cached token first (after a 403: the token expired).
    """
    if signing == "none":
        return href
    if token_url:
        use_token_endpoint(token_url)
    import planetary_computer
    import pydantic
    from planetary_computer import sas
    from planetary_computer.settings import Settings
    from planetary_computer.utils import parse_blob_url

    parts = urlsplit(href)
    if not parts.netloc.endswith(sas.BLOB_STORAGE_DOMAIN):
        return planetary_computer.sign(href)  # not blob storage: returned as is, no request
    account, container = parse_blob_url(parts)
    endpoint = f"{Settings.get().sas_url}/{account}/{container}"

    def attempt(number: int) -> str:
        if fresh or number > 0:
            sas.TOKEN_CACHE.pop(endpoint, None)
        # Fills the SDK's cache (no request while its token is valid); sign() then reads it.
        sas.get_token(account, container, retry_total=int(http_cfg["max_retries"]),
                      retry_backoff_factor=float(http_cfg["backoff_s"]))
        return planetary_computer.sign(href)

    def broken_answer(err: Exception) -> bool:
        # A status urllib3's retries did not cure, or no connection at all, is final.
        return not isinstance(err, requests.HTTPError | requests.exceptions.RetryError | requests.ConnectionError)

    return with_retries(attempt, what=f"signing {what} (SAS token from {redact(endpoint)})", http_cfg=http_cfg,
                        retryable=broken_answer,  # ValueError: not JSON; TypeError: JSON but not an object
                        errors=(requests.RequestException, pydantic.ValidationError, ValueError, TypeError))


_SETTINGS_LOCK = threading.Lock()


def use_token_endpoint(token_url: str) -> None:
    """Point the Planetary Computer SDK's token requests at ``token_url`` (``catalogs.<name>.token_url``).

    The SDK's own setting, ``Settings.get().sas_url`` (what ``PC_SDK_SAS_URL`` sets), changed
    in this process: ``get_token`` and ``sign`` then ask there, and cache tokens per endpoint.
    """
    from planetary_computer.settings import Settings

    with _SETTINGS_LOCK:
        settings = Settings.get()
        if settings.sas_url != token_url:
            settings.sas_url = token_url


# ============================================================================ windowed reads


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


def gdal_options(http_cfg: Mapping[str, Any], href: str | None = None) -> dict[str, Any]:
    """GDAL settings for reading COGs over HTTP: few requests, retries on 429/5xx, and the
    ``http.proxy`` (GDAL_HTTP_PROXY) unless ``href`` is on a loopback host."""
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MAX_RETRY": int(http_cfg["max_retries"]),
        "GDAL_HTTP_RETRY_DELAY": float(http_cfg["backoff_s"]),
        "GDAL_HTTP_TIMEOUT": int(http_cfg["timeout_s"]),
        "VSI_CACHE": "TRUE",
        # Fetched blocks, kept for the other sites of the part that need them (read_source
        # reads one file at a time so that a block is in it before the next thread asks).
        "CPL_VSIL_CURL_CACHE_SIZE": int(http_cfg.get("cache_mb", 256)) << 20,
    }
    proxy = http_cfg.get("proxy")
    if proxy and not (href and urlsplit(href).hostname in LOOPBACK_HOSTS):
        options["GDAL_HTTP_PROXY"] = proxy
    return options


#: Hosts read without the configured proxy (the demo's files on loopback, public like a bucket).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class SourceWindow:
    """Pixels read from a raster in its own grid: the part of it that a site needs."""

    data: np.ndarray  # (bands, rows, cols)
    transform: Affine
    crs: str

    def warp(self, grid: Grid, resampling: Resampling = Resampling.nearest,
             shift_m: tuple[float, float] = (0.0, 0.0), coverage: bool = True,
             nodata: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Resample onto ``grid``: (data (bands, h, w), covered (h, w) bool).

        ``shift_m`` = (dx, dy) in metres (dy northwards) is a known displacement of the source
        content: it is corrected by moving the source's georeferencing back by that much.
        ``covered`` is False where the grid falls outside the source window (all True without
        ``coverage``, for bands whose no-data value already tells it: a second warp saved).
        ``nodata``: the source's fill value, left out of the resampling kernel (a bilinear
        pixel beside the fill takes its valid neighbours only) and written where none is.
        """
        out = np.full((self.data.shape[0], grid.height, grid.width), 0 if nodata is None else nodata,
                      dtype=self.data.dtype)
        if self.data.size == 0:
            return out, np.zeros((grid.height, grid.width), dtype=bool)
        dx, dy = shift_m
        transform = Affine.translation(-dx, -dy) * self.transform
        reproject(self.data, out, src_transform=transform, src_crs=self.crs, dst_transform=grid.transform,
                  dst_crs=grid.crs, resampling=resampling, src_nodata=nodata, dst_nodata=nodata)
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
    catalog_cfg: Mapping[str, Any],
    http_cfg: Mapping[str, Any],
    what: str,
    indexes: Sequence[int] | None = None,
    resampling: Resampling = Resampling.nearest,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an asset resampled onto ``grid``: (data (bands, h, w), covered (h, w) bool)."""
    source = read_source(href, grid, catalog_cfg=catalog_cfg, http_cfg=http_cfg, what=what, indexes=indexes)
    return source.warp(grid, resampling)


def read_source(
    href: str,
    grid: Grid,
    *,
    catalog_cfg: Mapping[str, Any],
    http_cfg: Mapping[str, Any],
    what: str,
    indexes: Sequence[int] | None = None,
    margin_px: int = 2,
) -> SourceWindow:
    """Read the window of an asset that covers ``grid`` (plus ``margin_px`` source pixels).

    Only the blocks of the COG intersecting that window are fetched. The window is read with a
    plain ``read`` rather than through a WarpedVRT: GDAL's warper turns a failed block read (a
    truncated HTTP answer) into no-data with only a warning, while a direct read raises, and
    is retried (:func:`with_retries`), refetching (GDAL caches what it fetched, a truncated
    answer included); on 403 the href is signed again with a fresh token. The href is signed
    as its catalogue says (``catalog_cfg['signing']``). ``what`` names the read in errors (item
    id and asset key). A grid outside the raster gives an empty (0-pixel) window.
    """
    state = {"fresh": False}

    def attempt(number: int) -> SourceWindow:
        with _one_reader(href):
            return read(number)

    def read(number: int) -> SourceWindow:
        url = sign_href(href, catalog_cfg["signing"], http_cfg=http_cfg, what=what, fresh=state["fresh"],
                        token_url=catalog_cfg.get("token_url"))
        options = gdal_options(http_cfg, href)
        if number > 0:
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
            state["fresh"] = "403" in str(err)
            raise

    return with_retries(attempt, what=f"reading {what} from {redact(href)}", http_cfg=http_cfg,
                        retryable=lambda err: "404" not in str(err),  # a missing file stays missing
                        errors=(RasterioIOError,))


_READERS: dict[str, threading.Lock] = {}
_READERS_GUARD = threading.Lock()


def _one_reader(href: str) -> threading.Lock:
    """The lock of a file: its reads in one process go one at a time. Two threads reading sites
    that share a block would otherwise both fetch it (GDAL caches a block once its fetch ends);
    reads of different files still run in parallel."""
    with _READERS_GUARD:
        return _READERS.setdefault(href, threading.Lock())


def _source_window(src, grid: Grid, margin_px: int) -> Window | None:
    return source_window(src.transform, src.width, src.height, src.crs, grid, margin_px)


def source_window(transform: Affine, width: int, height: int, crs, grid: Grid, margin_px: int) -> Window | None:
    """The window of a raster (its ``transform``, size and ``crs``) covering ``grid`` plus a
    margin, clipped to the raster (None: outside). What a read fetches is the blocks it touches
    (:mod:`xstars.source_blocks` counts them without opening the file)."""
    left, bottom, right, top = transform_bounds(grid.crs, crs, *grid.bounds, densify_pts=21)
    window = from_bounds(left, bottom, right, top, transform=transform)
    col0 = max(math.floor(window.col_off) - margin_px, 0)
    row0 = max(math.floor(window.row_off) - margin_px, 0)
    col1 = min(math.ceil(window.col_off + window.width) + margin_px, width)
    row1 = min(math.ceil(window.row_off + window.height) + margin_px, height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


# ====================================================================================== WMS

#: The OGC standard rendering pixel (WMS 1.3.0, 7.2.4.6.9): scale denominator S is S x 0.28 mm a pixel.
OGC_PIXEL_M = 0.00028

WMS_NS = "http://www.opengis.net/wms"


@dataclass(frozen=True)
class WmsLayer:
    """A named layer of GetCapabilities: where it has data and the scales it is served at."""

    name: str
    bounds_wgs84: tuple[float, float, float, float] | None  # EX_GeographicBoundingBox (west, south, east, north)
    min_scale_denominator: float | None = None
    max_scale_denominator: float | None = None

    @property
    def finest_gsd_m(self) -> float | None:
        """The finest pixel the layer is served at: MinScaleDenominator x the OGC 0.28 mm pixel."""
        return None if self.min_scale_denominator is None else self.min_scale_denominator * OGC_PIXEL_M


@dataclass(frozen=True)
class WmsCapabilities:
    """What GetCapabilities says: the named layers and the service's limits (None: not announced)."""

    url: str
    layers: dict[str, WmsLayer]
    layer_limit: int | None  # layers one GetMap may ask for
    max_width: int | None  # pixels of one GetMap answer
    max_height: int | None


def parse_capabilities(content: bytes, url: str) -> WmsCapabilities:
    """A WMS 1.3.0 GetCapabilities document, read with OWSLib where it covers what is needed.

    OWSLib gives the named layers, their ``EX_GeographicBoundingBox`` (the parent's when a layer
    has none) and their scale denominators, but does not inherit those although WMS 1.3.0 says
    they are (7.2.4.6.9): a layer without its own takes its nearest ancestor's here. It does
    not read the service's ``LayerLimit``, ``MaxWidth`` and ``MaxHeight`` at all: those three
    are read from the document's ``<Service>`` element directly. Real Géoplateforme layers
    declare no EPSG:2154 box (only the geographic one and EPSG:3857): extents are compared in
    longitude/latitude.
    """
    import xml.etree.ElementTree as ET

    from owslib.wms import WebMapService

    try:
        service = WebMapService(url, version="1.3.0", xml=content)
        root = ET.fromstring(content)
    except Exception as err:  # noqa: BLE001 - OWSLib raises lxml's, ElementTree's or its own errors
        raise ServiceError(f"GetCapabilities at {url} is not a WMS 1.3.0 capabilities document: "
                           f"{redact(str(err))[:300]}") from None
    layers = {name: WmsLayer(name, tuple(layer.boundingBoxWGS84[:4]) if layer.boundingBoxWGS84 else None,
                             _inherited(layer, "min_scale_denominator"), _inherited(layer, "max_scale_denominator"))
              for name, layer in service.contents.items()}

    def limit(tag: str) -> int | None:
        text = (root.findtext(f"{{{WMS_NS}}}Service/{{{WMS_NS}}}{tag}") or "").strip()
        return int(text) if text.isdigit() and int(text) > 0 else None

    return WmsCapabilities(url, layers, limit("LayerLimit"), limit("MaxWidth"), limit("MaxHeight"))


def _inherited(layer, attribute: str) -> float | None:
    """A scale denominator of an OWSLib layer, or of its nearest ancestor that has one."""
    while layer is not None:
        element = getattr(layer, attribute, None)
        if element is not None and (element.text or "").strip():
            return float(element.text)
        layer = layer.parent
    return None


class WmsClient:
    """A minimal WMS 1.3.0 client: GetCapabilities and GetMap with retries and a rate limit.

    ``wms_cfg`` is the catalogue entry of the service (``catalogs.<name>``: ``url``, ``format``,
    ``max_requests_per_s``, ``max_concurrent_jobs``). The capabilities are read once per client,
    when first needed (the limits of GetMap come from them).
    """

    def __init__(self, wms_cfg: Mapping[str, Any], http_cfg: Mapping[str, Any]) -> None:
        self.url = wms_cfg["url"]
        self.cfg = wms_cfg
        self.timeout = float(http_cfg["timeout_s"])
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(max_retries=http_retry(http_cfg))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # The service's limit is shared by every job that may run at once (the workflow lets at
        # most max_concurrent_jobs of them query it: a Snakemake resource), so each takes its share.
        self.min_interval_s = float(wms_cfg["max_concurrent_jobs"]) / float(wms_cfg["max_requests_per_s"])
        self._next_slot = 0.0
        self._lock = threading.Lock()  # one client is shared by a build job's read threads
        self._capabilities: WmsCapabilities | None = None
        self._capabilities_lock = threading.Lock()

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

    def capabilities(self) -> WmsCapabilities:
        """The service's layers and limits (:func:`parse_capabilities`), asked for once."""
        with self._capabilities_lock:
            if self._capabilities is None:
                response = self.get({"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetCapabilities"},
                                    "GetCapabilities")
                self._capabilities = parse_capabilities(response.content, self.url)
            return self._capabilities

    def layers(self) -> dict[str, WmsLayer]:
        """The named layers of GetCapabilities."""
        return self.capabilities().layers

    def getmap_params(self, layer: str, bounds: Sequence[float], width: int, height: int) -> dict[str, str]:
        """One layer per GetMap: a WMS composites the layers of one request into one image."""
        return {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": layer, "STYLES": "",
                "CRS": "EPSG:2154", "BBOX": ",".join(f"{v:.2f}" for v in bounds), "WIDTH": str(width),
                "HEIGHT": str(height), "FORMAT": self.cfg["format"], "TRANSPARENT": "TRUE"}

    def getmap_url(self, layer: str, bounds: Sequence[float], width: int, height: int) -> str:
        return f"{self.url}?{urlencode(self.getmap_params(layer, bounds, width, height))}"

    def image(self, params: Mapping[str, str], what: str, url: str | None = None) -> np.ndarray:
        """A GetMap answer decoded: (bands, height, width) uint8, RGB(A) (a palette is expanded).

        A request beyond the service's LayerLimit, MaxWidth or MaxHeight is refused here, before
        it is sent (:func:`read_wms` splits a large one into tiles).
        """
        caps = self.capabilities()
        names = [n for n in params.get("LAYERS", "").split(",") if n]
        width, height = int(params.get("WIDTH", 0)), int(params.get("HEIGHT", 0))
        if caps.layer_limit is not None and len(names) > caps.layer_limit:
            raise ServiceError(f"{what}: {len(names)} layers in one GetMap, {caps.url} allows {caps.layer_limit}")
        if (caps.max_width and width > caps.max_width) or (caps.max_height and height > caps.max_height):
            raise ServiceError(f"{what}: {width} x {height} pixels, {caps.url} serves at most "
                               f"{caps.max_width} x {caps.max_height}")
        response = self.get(params, what, url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a PNG carries no georeferencing
            with MemoryFile(response.content) as memfile, memfile.open() as image:
                data = image.read()
                if image.count == 1 and image.colorinterp[0] == ColorInterp.palette:
                    colours = image.colormap(1)
                    table = np.array([colours.get(i, (0, 0, 0, 0)) for i in range(256)], dtype=np.uint8)
                    data = np.moveaxis(table[data[0]], -1, 0)  # (4, h, w): RGBA
                return data

    def thumbnail(self, layer: str, bounds: Sequence[float], size_px: int = 16) -> np.ndarray:
        """A small GetMap of ``bounds``: how much of it has no image is measured on it."""
        return self.image(self.getmap_params(layer, bounds, size_px, size_px), f"GetMap {layer}")


def _exception_text(response) -> str:
    text = response.text[:400] if "xml" in response.headers.get("Content-Type", "") else ""
    return redact(" ".join(text.split()))


def read_wms(href: str, grid: Grid, margin_m: float, client: WmsClient, what: str) -> SourceWindow:
    """A GetMap request (the manifest's asset) redone over ``grid``'s bounds grown by ``margin_m``.

    When that is more pixels than the service's MaxWidth or MaxHeight, it is asked for in tiles
    of the same pixel grid, pasted together: the same pixels as one request. The answer keeps
    its alpha band when it has one (transparent: no image there).
    """
    parts = urlsplit(href)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    url = parts._replace(query="").geturl()
    xmin, ymin, xmax, ymax = grid.bounds
    gsd = grid.transform.a
    left, top = xmin - margin_m, ymax + margin_m
    width, height = round((xmax - xmin + 2 * margin_m) / gsd), round((ymax - ymin + 2 * margin_m) / gsd)
    caps = client.capabilities()
    tile_width, tile_height = min(width, caps.max_width or width), min(height, caps.max_height or height)
    tiles = [(row, col) for row in range(0, height, tile_height) for col in range(0, width, tile_width)]
    out = None
    for row, col in tiles:
        w, h = min(tile_width, width - col), min(tile_height, height - row)
        bounds = (left + col * gsd, top - (row + h) * gsd, left + (col + w) * gsd, top - row * gsd)
        params.update(BBOX=",".join(f"{v:.2f}" for v in bounds), WIDTH=str(w), HEIGHT=str(h), CRS=grid.crs)
        label = f"GetMap {what}" + (f" tile {tiles.index((row, col)) + 1}/{len(tiles)}" if len(tiles) > 1 else "")
        data = client.image(params, label, url=url)
        if out is None:
            out = np.zeros((data.shape[0], height, width), dtype=data.dtype)
        out[:, row:row + h, col:col + w] = data
    return SourceWindow(out, Affine(gsd, 0.0, left, 0.0, -gsd, top), grid.crs)


# ============================================================= configured layers vs the service


def layer_years(template: str, names: Iterable[str]) -> list[int]:
    """The years Y for which ``template.format(year=Y)`` is one of ``names``."""
    pattern = re.compile(re.escape(template).replace(re.escape("{year}"), r"(\d{4})", 1)
                         .replace(re.escape("{year}"), r"\1"))
    return sorted({int(m.group(1)) for name in names if (m := pattern.fullmatch(name))})


def _year_ranges(years: Sequence[int]) -> str:
    """2001, 2002, 2003, 2005 -> '2001-2003, 2005'."""
    runs: list[list[int]] = []
    for year in sorted(years):
        if runs and runs[-1][-1] == year - 1:
            runs[-1].append(year)
        else:
            runs.append([year])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def wms_layer_problems(sensor, caps: WmsCapabilities) -> list[str]:
    """What a ``wms_layers`` sensor asks for that the service does not serve, one text each.

    Every configured layer (``sensors.<name>.layers[i].name`` with ``{year}`` over
    ``sensors.<name>.years``) must be a layer of the capabilities; the answer names the years
    the service has of it, and the nearest ones. ``sensors.<name>.gsd_m`` must be no finer than
    the finest pixel the layers are served at (their MinScaleDenominator).
    """
    problems = []
    years = list(sensor.cfg["years"])
    for i, layer in enumerate(sensor.cfg["layers"]):
        template = layer["name"]
        missing = [year for year in years if template.format(year=year) not in caps.layers]
        if not missing:
            continue
        served = layer_years(template, caps.layers)
        nearest = sorted({min(served, key=lambda y, m=m: (abs(y - m), y)) for m in missing}) if served else []
        has = (f"it serves {_year_ranges(served)}, nearest {', '.join(map(str, nearest))}" if served
               else "it serves no year of it")
        problems.append(f"sensors.{sensor.name}.layers[{i}].name {template!r} for sensors.{sensor.name}.years "
                        f"{_year_ranges(missing)}: {', '.join(template.format(year=y) for y in missing)} not served "
                        f"({has})")
    finest = [(caps.layers[n].finest_gsd_m, n) for year in years for n in sensor.layer_names(year).values()
              if n in caps.layers and caps.layers[n].finest_gsd_m is not None]
    if finest:
        coarsest, name = max(finest)
        if sensor.gsd_m < coarsest * (1 - 1e-9):
            problems.append(f"sensors.{sensor.name}.gsd_m {sensor.gsd_m:g} is finer than {name} is served at: "
                            f"{coarsest:.3f} m at best (MinScaleDenominator {caps.layers[name].min_scale_denominator:g}"
                            f" x the OGC standard pixel of 0.28 mm)")
    return problems


def check_wms_sensor(sensor, caps: WmsCapabilities) -> None:
    """ConfigError listing :func:`wms_layer_problems` in one message, if there is any."""
    problems = wms_layer_problems(sensor, caps)
    if problems:
        raise ConfigError(f"sensors.{sensor.name} against the GetCapabilities of {caps.url}: " + "; ".join(problems))


def describe_wms_sensor(sensor, caps: WmsCapabilities) -> list[str]:
    """Lines saying, per configured layer and year, whether the service has it (``xstars catalog wms-layers``)."""
    head = (f"{sensor.name}: {caps.url} (LayerLimit {caps.layer_limit}, MaxWidth {caps.max_width}, "
            f"MaxHeight {caps.max_height}); sensors.{sensor.name}.gsd_m {sensor.gsd_m:g}")
    lines = [head]
    for i, layer in enumerate(sensor.cfg["layers"]):
        served = layer_years(layer["name"], caps.layers)
        lines.append(f"  sensors.{sensor.name}.layers[{i}].name {layer['name']}: years served "
                     f"{_year_ranges(served) or 'none'}")
        for year in sensor.cfg["years"]:
            name = layer["name"].format(year=year)
            found = caps.layers.get(name)
            state = "missing" if found is None else "live" + (
                f", finest {found.finest_gsd_m:.3f} m" if found.finest_gsd_m is not None else "")
            lines.append(f"    {year} {name}: {state}")
    return lines
