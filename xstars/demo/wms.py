"""Pure logic of the demo WMS: layers, GetCapabilities XML, GetMap parsing and rendering.

The demo gateway (:mod:`xstars.demo.gateway`) answers ``/wms`` like the IGN Géoplateforme's
raster WMS (``https://data.geopf.fr/wms-r``, OGC WMS 1.3.0). This module holds everything that
does not touch HTTP, as small functions that tests can call directly; the HTTP handler only
dispatches to them.

Layers are described by ``<root>/wms/layers.json`` (:func:`xstars.demo.layout.wms_layers_path`)::

    {"layers": [
        {"name": "ORTHOIMAGERY.ORTHOPHOTOS2021",      # WMS layer name (LAYERS=...)
         "title": "Orthophotos 2021",                 # human title
         "abstract": "Synthetic 0.5 m orthophoto",    # free text
         "year": 2021,                                # acquisition year (optional)
         "bands": ["R", "G", "B"],                    # one name per output band
         "fill": [255, 255, 255],                     # optional: colour outside the sources
                                                      # (default [0, 0, 0]; null: transparent)
         "sources": [                                 # one GeoTIFF per city, disjoint in space
            {"path": "files/wms/bd_ortho/2021/toulouse.tif",   # relative to the world root
             "band_indexes": [1, 2, 3]}                     # 1-based bands of that file
         ]}
    ],
     "service": {"max_width": 4096, "max_height": 4096}}   # optional: the GetMap size limits

Every source must be a Lambert-93 (EPSG:2154) uint8 GeoTIFF. A GetMap answer has exactly
``WIDTH x HEIGHT`` pixels covering exactly ``BBOX`` (WMS boxes are the outer edges of the pixel
grid), resampled from the sources with GDAL's warper: bilinear at native or finer resolution,
average when downsampling. Pixels outside every source have the layer's opaque fill colour (black
unless ``fill`` says otherwise: a ROK4 layer outside the area flown that year may be white), or,
with ``"fill": null``, are white and transparent (an alpha band, 0 there) when the format has one.

GetCapabilities is shaped like the Géoplateforme's for what a client must handle: per layer an
``EX_GeographicBoundingBox`` and an EPSG:3857 ``BoundingBox`` only (no Lambert-93 box, although
GetMap takes ``CRS=EPSG:2154``), a ``MinScaleDenominator`` (the finest source pixel over the OGC
0.28 mm pixel) and ``MaxScaleDenominator``; the service's ``LayerLimit``, ``MaxWidth`` and
``MaxHeight``.

Supported: ``VERSION=1.3.0`` (and the ``SRS``/lon-lat conventions of 1.1.1), ``CRS`` EPSG:2154
and EPSG:4326 (in 1.3.0, EPSG:4326 boxes are ``lat_min,lon_min,lat_max,lon_max`` as the standard
says), formats ``image/png``, ``image/jpeg``, ``image/tiff`` (a GeoTIFF), one layer per request.
Errors are raised as :class:`WmsError` and turned into a ``ServiceExceptionReport`` by
:func:`exception_report`.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject, transform_bounds

from xstars.demo import layout
from xstars.errors import DataError

WMS_NS = "http://www.opengis.net/wms"
XLINK_NS = "http://www.w3.org/1999/xlink"
OGC_NS = "http://www.opengis.net/ogc"

#: Largest WIDTH or HEIGHT accepted by GetMap by default (the Géoplateforme announces 10000).
MAX_SIZE = 4096

#: Layers one GetMap may name (this WMS renders one; the Géoplateforme announces 2).
LAYER_LIMIT = 1

#: The OGC standard rendering pixel (WMS 1.3.0): a scale denominator S is S x 0.28 mm a pixel.
OGC_PIXEL_M = 0.00028

#: The coarsest scale announced (as the Géoplateforme's layers do: about 1:8.7 million).
MAX_SCALE_DENOMINATOR = 8735660.375448715

#: MIME type -> GDAL driver of the GetMap output formats.
FORMATS: dict[str, str] = {"image/png": "PNG", "image/tiff": "GTiff", "image/jpeg": "JPEG"}

#: CRS codes accepted by GetMap (the sources themselves are all EPSG:2154).
SUPPORTED_CRS: tuple[str, ...] = ("EPSG:2154", "EPSG:4326")

#: Style names treated as "the default style" (clients usually send an empty STYLES=).
DEFAULT_STYLES = frozenset({"", "default", "normal"})

SOURCE_CRS = CRS.from_epsg(2154)


class WmsError(Exception):
    """A request the WMS refuses; ``code`` is the OGC exception code (None for a generic error)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Source:
    """One GeoTIFF contributing to a layer (typically one city)."""

    path: Path  # absolute
    band_indexes: tuple[int, ...]  # 1-based, one per layer band
    bounds: tuple[float, float, float, float]  # Lambert-93 (left, bottom, right, top)
    resolution: float  # pixel size in metres (the larger of x and y)


@dataclass(frozen=True)
class Layer:
    """A WMS layer as announced by GetCapabilities and rendered by GetMap."""

    name: str
    title: str
    abstract: str
    year: int | None
    bands: tuple[str, ...]
    sources: tuple[Source, ...]
    fill: tuple[int, ...] | None = (0, 0, 0)  # outside the sources; None: transparent

    @property
    def min_scale_denominator(self) -> float:
        """The finest source pixel as a scale denominator (what MinScaleDenominator announces)."""
        return min((s.resolution for s in self.sources), default=1.0) / OGC_PIXEL_M

    @property
    def bounds_l93(self) -> tuple[float, float, float, float]:
        """Union of the sources' extents in Lambert-93 (minx, miny, maxx, maxy)."""
        return _union([s.bounds for s in self.sources])

    @property
    def bounds_wgs84(self) -> tuple[float, float, float, float]:
        """Union of the sources' extents in longitude/latitude (west, south, east, north)."""
        return _union(
            [
                transform_bounds(SOURCE_CRS, "EPSG:4326", *s.bounds, densify_pts=21)
                for s in self.sources
            ]
        )


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    if not boxes:  # a layer without sources: announce an empty box at the origin
        return (0.0, 0.0, 0.0, 0.0)
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _load_source(root: Path, entry: Mapping, layer_name: str, n_bands: int) -> Source:
    """Open one source to check it (CRS, dtype, band indexes) and remember its extent."""
    path = (root / entry["path"]).resolve()
    band_indexes = tuple(int(i) for i in entry["band_indexes"])
    if len(band_indexes) != n_bands:
        raise DataError(
            f"WMS layer {layer_name}: source {path} has {len(band_indexes)} band_indexes "
            f"but the layer has {n_bands} bands"
        )
    if not path.is_file():
        raise DataError(f"WMS layer {layer_name}: source file {path} does not exist")
    with rasterio.open(path) as ds:
        if ds.crs is None or ds.crs.to_epsg() != 2154:
            raise DataError(f"WMS source {path} must be in EPSG:2154, found {ds.crs}")
        if any(i < 1 or i > ds.count for i in band_indexes):
            raise DataError(f"WMS source {path} has {ds.count} bands, asked for {band_indexes}")
        if any(ds.dtypes[i - 1] != "uint8" for i in band_indexes):
            raise DataError(f"WMS source {path} must be uint8, found {ds.dtypes}")
        bounds = (ds.bounds.left, ds.bounds.bottom, ds.bounds.right, ds.bounds.top)
        resolution = max(abs(ds.res[0]), abs(ds.res[1]))
    return Source(path=path, band_indexes=band_indexes, bounds=bounds, resolution=resolution)


def load_layers(root: Path) -> dict[str, Layer]:
    """Read ``<root>/wms/layers.json`` (see the module docstring); {} when the file is absent.

    Raises DataError naming the file when a layer or a source is inconsistent, so that a broken
    world fails when the server starts rather than on the first GetMap.
    """
    root = Path(root)
    path = layout.wms_layers_path(root)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        entries = doc["layers"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected {{'layers': [...]}}: {exc}") from exc
    layers: dict[str, Layer] = {}
    for entry in entries:
        try:
            name = str(entry["name"])
            bands = tuple(str(b) for b in entry["bands"])
            sources = tuple(_load_source(root, s, name, len(bands)) for s in entry["sources"])
        except KeyError as exc:
            raise DataError(f"{path}: a layer lacks the key {exc}") from exc
        year = entry.get("year")
        fill = entry.get("fill", [0] * len(bands))
        if fill is not None and len(fill) != len(bands):
            raise DataError(f"{path}: layer {name} has {len(bands)} bands but a fill of {len(fill)} values")
        layers[name] = Layer(
            name=name,
            title=str(entry.get("title", name)),
            abstract=str(entry.get("abstract", "")),
            year=int(year) if year is not None else None,
            bands=bands,
            sources=sources,
            fill=None if fill is None else tuple(int(v) for v in fill),
        )
    return layers


@dataclass(frozen=True)
class ServiceLimits:
    """The limits GetCapabilities announces and GetMap enforces."""

    layer_limit: int = LAYER_LIMIT
    max_width: int = MAX_SIZE
    max_height: int = MAX_SIZE


def load_limits(root: Path) -> ServiceLimits:
    """The ``service`` entry of ``<root>/wms/layers.json`` (the defaults when absent)."""
    path = layout.wms_layers_path(Path(root))
    service = json.loads(path.read_text()).get("service", {}) if path.exists() else {}
    return ServiceLimits(max_width=int(service.get("max_width", MAX_SIZE)),
                         max_height=int(service.get("max_height", MAX_SIZE)))


# --------------------------------------------------------------------------------- parameters


def normalize_params(query: str) -> dict[str, str]:
    """Query string -> {UPPERCASE name: value}; WMS parameter names are case-insensitive.

    The first occurrence of a repeated name wins; empty values are kept (``STYLES=`` matters).
    """
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(key.upper(), value)
    return params


@dataclass(frozen=True)
class GetMapRequest:
    """A validated GetMap request.

    ``bbox`` is always (xmin, ymin, xmax, ymax) in the axis order of ``crs`` as GDAL sees it
    (easting/northing for EPSG:2154, longitude/latitude for EPSG:4326), whatever the WMS version.
    """

    layer: str
    crs: str
    bbox: tuple[float, float, float, float]
    width: int
    height: int
    format: str
    transparent: bool = False

    @property
    def transform(self) -> Affine:
        """Affine transform of the output grid (BBOX edges are the pixel grid's outer edges)."""
        xmin, ymin, xmax, ymax = self.bbox
        # Written out rather than rasterio.transform.from_bounds, which warns on every call
        # (PendingDeprecationWarning in rasterio 1.4).
        return Affine(
            (xmax - xmin) / self.width, 0.0, xmin, 0.0, -(ymax - ymin) / self.height, ymax
        )


def _require(params: Mapping[str, str], name: str) -> str:
    if name not in params:
        raise WmsError(f"Missing required parameter {name}", "MissingParameterValue")
    return params[name]


def _parse_size(params: Mapping[str, str], name: str, max_size: int) -> int:
    raw = _require(params, name)
    try:
        value = int(raw)
    except ValueError:
        raise WmsError(f"{name}={raw!r} is not an integer", "InvalidParameterValue") from None
    if not 1 <= value <= max_size:
        raise WmsError(f"{name}={value} must be between 1 and {max_size}", "InvalidParameterValue")
    return value


def _parse_bbox(raw: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in raw.split(","))
    except ValueError:
        raise WmsError(f"BBOX={raw!r} is not 4 numbers", "InvalidParameterValue") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise WmsError(f"BBOX={raw!r} must be minx,miny,maxx,maxy", "InvalidParameterValue")
    if not (values[0] < values[2] and values[1] < values[3]):
        raise WmsError(f"BBOX={raw!r} is empty or inverted", "InvalidParameterValue")
    return values  # type: ignore[return-value]


def parse_getmap(
    params: Mapping[str, str], layers: Mapping[str, Layer], limits: ServiceLimits = ServiceLimits()
) -> GetMapRequest:
    """Validate the (uppercased) parameters of a GetMap request; raises WmsError."""
    version = params.get("VERSION", "1.3.0")
    if version not in ("1.3.0", "1.1.1", "1.1.0"):
        raise WmsError(f"VERSION={version} is not supported (use 1.3.0)", "InvalidParameterValue")

    names = [n for n in _require(params, "LAYERS").split(",") if n]
    if len(names) != 1:
        raise WmsError("Exactly one layer per GetMap request is supported", "InvalidParameterValue")
    if names[0] not in layers:
        raise WmsError(f"Layer {names[0]!r} is not defined", "LayerNotDefined")

    styles = params.get("STYLES", "")
    if styles.split(",")[0].lower() not in DEFAULT_STYLES:
        raise WmsError(f"Style {styles!r} is not defined", "StyleNotDefined")

    # 1.3.0 names it CRS, 1.1.x names it SRS; accept either.
    crs = params.get("CRS", params.get("SRS"))
    if crs is None:
        raise WmsError("Missing required parameter CRS", "MissingParameterValue")
    crs = crs.upper()
    if crs not in SUPPORTED_CRS:
        code = "InvalidCRS" if version == "1.3.0" else "InvalidSRS"
        raise WmsError(f"CRS {crs} is not supported (use one of {', '.join(SUPPORTED_CRS)})", code)

    bbox = _parse_bbox(_require(params, "BBOX"))
    if crs == "EPSG:4326" and version == "1.3.0":
        # WMS 1.3.0 follows the EPSG axis order: latitude first. GDAL wants lon/lat.
        bbox = (bbox[1], bbox[0], bbox[3], bbox[2])

    fmt = _require(params, "FORMAT").split(";")[0].strip().lower()
    if fmt not in FORMATS:
        raise WmsError(f"FORMAT={fmt} is not supported (use {', '.join(FORMATS)})", "InvalidFormat")

    return GetMapRequest(
        layer=names[0],
        crs=crs,
        bbox=bbox,
        width=_parse_size(params, "WIDTH", limits.max_width),
        height=_parse_size(params, "HEIGHT", limits.max_height),
        format=fmt,
        transparent=params.get("TRANSPARENT", "FALSE").upper() == "TRUE",
    )


# ---------------------------------------------------------------------------------- rendering


def _boxes_intersect(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _resampling_for(source: Source, req: GetMapRequest) -> Resampling:
    """Average when each output pixel covers more than one source pixel, else bilinear."""
    bbox_l93 = transform_bounds(req.crs, SOURCE_CRS, *req.bbox, densify_pts=21)
    out_res = max((bbox_l93[2] - bbox_l93[0]) / req.width, (bbox_l93[3] - bbox_l93[1]) / req.height)
    # The tolerance keeps a native-resolution request (tiny float error) on the bilinear path,
    # which reproduces the source pixels exactly when the grids are aligned.
    return Resampling.average if out_res > source.resolution * (1 + 1e-6) else Resampling.bilinear


def _coverage_mask(source: Source, req: GetMapRequest) -> np.ndarray:
    """Output pixels whose centre lies inside the source (bool, height x width).

    Needed because GDAL's average resampling also fills the row/column of output pixels just
    outside a source's left/top edge with the edge's values; masking keeps "outside = 0" exact.
    """
    xmin, ymin, xmax, ymax = req.bbox
    xs = xmin + (np.arange(req.width) + 0.5) * (xmax - xmin) / req.width
    ys = ymax - (np.arange(req.height) + 0.5) * (ymax - ymin) / req.height
    left, bottom, right, top = source.bounds
    if CRS.from_string(req.crs) == SOURCE_CRS:  # same axes: the test is separable
        return ((ys > bottom) & (ys <= top))[:, None] & ((xs >= left) & (xs < right))[None, :]
    # Another CRS: project the pixel centres, only inside the source's box in that CRS.
    box = transform_bounds(SOURCE_CRS, req.crs, *source.bounds, densify_pts=21)
    cols = np.nonzero((xs >= box[0]) & (xs <= box[2]))[0]
    rows = np.nonzero((ys >= box[1]) & (ys <= box[3]))[0]
    mask = np.zeros((req.height, req.width), dtype=bool)
    if cols.size and rows.size:
        grid_x, grid_y = np.meshgrid(xs[cols], ys[rows])
        to_source = Transformer.from_crs(req.crs, SOURCE_CRS, always_xy=True)
        x, y = to_source.transform(grid_x, grid_y)
        inside = (x >= left) & (x < right) & (y > bottom) & (y <= top)
        mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = inside
    return mask


def render_array(req: GetMapRequest, layer: Layer) -> np.ndarray:
    """Resample the layer's sources onto the request's grid: uint8 array (bands, height, width).

    Outside the sources: the layer's fill colour. A transparent layer (``fill`` null) is white
    there, as ROK4's no-data, and asked for with ``TRANSPARENT=TRUE`` in a format with an alpha
    band (PNG) gets one more band, 0 there: only the alpha says the white is no image.
    """
    covered = np.zeros((req.height, req.width), dtype=bool)
    out = _render_sources(req, layer, covered)
    out[:, ~covered] = np.asarray(layer.fill or [255] * len(layer.bands), dtype=np.uint8)[:, None]
    if layer.fill is None and req.transparent and FORMATS[req.format] == "PNG" and len(layer.bands) < 4:
        out = np.concatenate([out, np.where(covered, 255, 0).astype(np.uint8)[None]])
    return out


def _render_sources(req: GetMapRequest, layer: Layer, covered: np.ndarray) -> np.ndarray:
    """The sources' pixels on the request's grid; ``covered`` is set where a source has one."""
    out = np.zeros((len(layer.bands), req.height, req.width), dtype=np.uint8)
    dst_crs = CRS.from_string(req.crs)
    for source in layer.sources:
        source_box = transform_bounds(SOURCE_CRS, dst_crs, *source.bounds, densify_pts=21)
        if not _boxes_intersect(source_box, req.bbox):
            continue  # most requests touch one city only: do not open the others
        warped = np.zeros_like(out)
        with rasterio.open(source.path) as ds:
            reproject(
                source=rasterio.band(ds, list(source.band_indexes)),
                destination=warped,
                dst_transform=req.transform,
                dst_crs=dst_crs,
                resampling=_resampling_for(source, req),
            )
        # Sources are disjoint: each output pixel takes the one source its centre falls in.
        mask = _coverage_mask(source, req)
        out[:, mask] = warped[:, mask]
        covered |= mask
    return out


def encode_image(array: np.ndarray, fmt: str, crs: str, transform: Affine) -> bytes:
    """Encode a (bands, h, w) uint8 array as PNG, JPEG or GeoTIFF bytes with GDAL.

    Only the GeoTIFF carries georeferencing: giving it to the PNG/JPEG drivers would make GDAL
    write a side-car .aux.xml, which a WMS answer cannot carry anyway.
    """
    driver = FORMATS[fmt]
    count = array.shape[0]
    if driver == "JPEG" and count not in (1, 3):
        raise WmsError(f"A {count}-band layer cannot be encoded as {fmt}", "InvalidFormat")
    if driver == "PNG" and count > 4:
        raise WmsError(f"A {count}-band layer cannot be encoded as {fmt}", "InvalidFormat")
    profile: dict = {
        "driver": driver,
        "width": array.shape[2],
        "height": array.shape[1],
        "count": count,
        "dtype": "uint8",
    }
    if driver == "GTiff":
        profile.update(crs=CRS.from_string(crs), transform=transform, compress="deflate")
    ext = {"PNG": ".png", "JPEG": ".jpg", "GTiff": ".tif"}[driver]
    with warnings.catch_warnings():
        # PNG/JPEG are written without georeferencing on purpose (see above).
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(ext=ext) as memfile:
            with memfile.open(**profile) as dst:
                dst.write(array)
            return memfile.read()


def render_getmap(req: GetMapRequest, layers: Mapping[str, Layer]) -> bytes:
    """Answer a validated GetMap request with the encoded image."""
    array = render_array(req, layers[req.layer])
    return encode_image(array, req.format, req.crs, req.transform)


# ------------------------------------------------------------------------------------------ XML


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    """Add a child element. Tags are written unprefixed: the root declares WMS as the default
    namespace (see :func:`capabilities_xml`), which keeps the document readable."""
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _online_resource(parent: ET.Element, url: str) -> None:
    ET.SubElement(parent, "OnlineResource", {"xlink:type": "simple", "xlink:href": url})


def _geographic_box(
    parent: ET.Element, west: float, south: float, east: float, north: float
) -> None:
    box = _sub(parent, "EX_GeographicBoundingBox")
    _sub(box, "westBoundLongitude", f"{west:.6f}")
    _sub(box, "eastBoundLongitude", f"{east:.6f}")
    _sub(box, "southBoundLatitude", f"{south:.6f}")
    _sub(box, "northBoundLatitude", f"{north:.6f}")


def _bounding_box_3857(parent: ET.Element, layer_l93: tuple) -> None:
    """The one projected box the Géoplateforme declares per layer: Web Mercator."""
    box = transform_bounds(SOURCE_CRS, "EPSG:3857", *layer_l93, densify_pts=21)
    _sub(parent, "BoundingBox", CRS="EPSG:3857", minx=f"{box[0]:.6f}", miny=f"{box[1]:.6f}",
         maxx=f"{box[2]:.6f}", maxy=f"{box[3]:.6f}")


def _layer_element(parent: ET.Element, layer: Layer) -> None:
    element = _sub(parent, "Layer", queryable="0", opaque="1")
    _sub(element, "Name", layer.name)
    _sub(element, "Title", layer.title)
    _sub(element, "Abstract", layer.abstract)
    keywords = _sub(element, "KeywordList")
    for band in layer.bands:
        _sub(keywords, "Keyword", f"band:{band}")
    if layer.year is not None:
        _sub(keywords, "Keyword", f"year:{layer.year}")
    for crs in SUPPORTED_CRS:
        _sub(element, "CRS", crs)
    _geographic_box(element, *layer.bounds_wgs84)
    _bounding_box_3857(element, layer.bounds_l93)
    style = _sub(element, "Style")
    _sub(style, "Name", "normal")
    _sub(style, "Title", "Default style")
    _sub(element, "MinScaleDenominator", f"{layer.min_scale_denominator:.9f}")
    _sub(element, "MaxScaleDenominator", f"{MAX_SCALE_DENOMINATOR:.9f}")


def capabilities_xml(
    layers: Mapping[str, Layer], service_url: str, limits: ServiceLimits = ServiceLimits()
) -> bytes:
    """The WMS 1.3.0 GetCapabilities document listing ``layers``, served at ``service_url``."""
    # Namespaces are declared as plain attributes rather than through ElementTree's global
    # prefix registry, which would leak into every other user of ElementTree in the process.
    root = ET.Element(
        "WMS_Capabilities", {"version": "1.3.0", "xmlns": WMS_NS, "xmlns:xlink": XLINK_NS}
    )

    service = _sub(root, "Service")
    _sub(service, "Name", "WMS")
    _sub(service, "Title", "xstars demo WMS (offline stand-in for data.geopf.fr/wms-r)")
    _sub(service, "Abstract", "Synthetic raster layers of the xstars demo world.")
    _online_resource(service, service_url)
    _sub(service, "Fees", "none")
    _sub(service, "AccessConstraints", "none")
    _sub(service, "LayerLimit", str(limits.layer_limit))
    _sub(service, "MaxWidth", str(limits.max_width))
    _sub(service, "MaxHeight", str(limits.max_height))

    capability = _sub(root, "Capability")
    request = _sub(capability, "Request")
    for operation, formats in (("GetCapabilities", ["text/xml"]), ("GetMap", list(FORMATS))):
        op = _sub(request, operation)
        for fmt in formats:
            _sub(op, "Format", fmt)
        get = _sub(_sub(_sub(op, "DCPType"), "HTTP"), "Get")
        _online_resource(get, service_url + "?")
    exception = _sub(capability, "Exception")
    _sub(exception, "Format", "XML")

    top = _sub(capability, "Layer")
    _sub(top, "Title", "xstars demo layers")
    for crs in SUPPORTED_CRS:
        _sub(top, "CRS", crs)
    if layers:
        _geographic_box(top, *_union([layer.bounds_wgs84 for layer in layers.values()]))
        _bounding_box_3857(top, _union([layer.bounds_l93 for layer in layers.values()]))
    for layer in layers.values():
        _layer_element(top, layer)

    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def exception_report(message: str, code: str | None = None) -> bytes:
    """A WMS 1.3.0 ``ServiceExceptionReport`` document carrying one exception."""
    root = ET.Element("ServiceExceptionReport", {"version": "1.3.0", "xmlns": OGC_NS})
    attrib = {"code": code} if code else {}
    exception = ET.SubElement(root, "ServiceException", attrib)
    exception.text = message
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
