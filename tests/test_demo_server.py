"""The demo gateway against real clients: pystac-client, GDAL /vsicurl/ (rasterio), HTTP WMS.

A tiny world is built here (not with the generator): two 512x512 uint16 COGs in UTM 31N, two
Lambert-93 "ortho" GeoTIFFs (two cities) behind one WMS layer, 30 STAC items and a
collections.json. The servers run for real on free loopback ports; nothing is mocked.

The ortho pattern makes GetMap answers checkable by hand: band 1 = column, band 2 = row,
band 3 = a per-city constant, band 4 = 255, at 1 m per pixel.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import planetary_computer
import pytest
import rasterio
import requests
from pystac_client import Client
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from xstars.demo import control, gateway_files, gateway_stac, layout
from xstars.demo.control import ServerInfo
from xstars.demo.faults import Faults
from xstars.errors import ServiceError

pytestmark = pytest.mark.timeout(120)

WMS_NS = {"w": "http://www.opengis.net/wms"}
OGC_NS = {"ogc": "http://www.opengis.net/ogc"}
LAYER = "ORTHOIMAGERY.ORTHOPHOTOS2021"
ORTHO_SIZE = 200  # pixels of 1 m
# Upper-left corners (Lambert-93) of the two cities' orthos; 200 m apart, so disjoint.
CITY_ORIGINS = {"toulouse": (574000.0, 6280000.0), "muret": (574400.0, 6280000.0)}
CITY_CONSTANT = {"toulouse": 100, "muret": 150}
COG_IDS = ("S2A_MSIL2A_20210601T103021_T31TCJ", "S2B_MSIL2A_20210611T103021_T31TCJ")
N_MATCHING = 26  # items in the Toulouse box during 2021; 4 more are outside it
SEARCH = {"bbox": [1.3, 43.5, 1.6, 43.7], "datetime": "2021-01-01/2021-12-31"}


# ------------------------------------------------------------------------------------ helpers


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (the OS picks them; the sockets are held until all are picked)."""
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def port_is_free(port: int) -> bool:
    """True when a server could listen on the port (SO_REUSEADDR, as servers do, so that
    TIME_WAIT leftovers of closed connections do not count as "in use")."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_cog(path: Path, seed: int) -> None:
    """A 512x512 uint16 COG in UTM 31N with 128-pixel tiles (random: incompressible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 10000, (1, 512, 512), dtype=np.uint16)
    profile = {
        "driver": "COG",
        "width": 512,
        "height": 512,
        "count": 1,
        "dtype": "uint16",
        "crs": "EPSG:32631",
        "transform": Affine(10, 0, 370000, 0, -10, 4830000),
        "BLOCKSIZE": 128,
        "COMPRESS": "DEFLATE",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def ortho_array(city: str) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(ORTHO_SIZE), np.arange(ORTHO_SIZE))
    bands = [cols, rows, np.full_like(cols, CITY_CONSTANT[city]), np.full_like(cols, 255)]
    return np.stack(bands).astype(np.uint8)


def write_ortho(path: Path, city: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x0, y0 = CITY_ORIGINS[city]
    profile = {
        "driver": "GTiff",
        "width": ORTHO_SIZE,
        "height": ORTHO_SIZE,
        "count": 4,
        "dtype": "uint8",
        "crs": "EPSG:2154",
        "transform": Affine(1.0, 0, x0, 0, -1.0, y0),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(ortho_array(city))


def make_item(i: int) -> dict:
    """Item i: mostly over Toulouse in 2021; i = 26..27 over Paris, 28..29 in 2020."""
    lon, lat = (2.35, 48.85) if i in (26, 27) else (1.44, 43.6)
    year = 2020 if i in (28, 29) else 2021
    day = 1 + (i * 11) % 330
    datetime = f"{year}-{1 + day // 28 % 12:02d}-{1 + day % 28:02d}T10:30:{i:02d}Z"
    item_id = COG_IDS[i] if i < len(COG_IDS) else f"S2X_MSIL2A_{year}_{i:03d}_T31TCJ"
    box = [lon - 0.05, lat - 0.05, lon + 0.05, lat + 0.05]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "collection": "sentinel-2-l2a",
        "bbox": box,
        "geometry": {
            "type": "Polygon",
            "coordinates": [
                [
                    [box[0], box[1]],
                    [box[2], box[1]],
                    [box[2], box[3]],
                    [box[0], box[3]],
                    [box[0], box[1]],
                ]
            ],
        },
        "properties": {"datetime": datetime, "eo:cloud_cover": float(i)},
        "links": [],
        "assets": {
            "B04": {
                "href": f"{layout.FILES_URL_PLACEHOLDER}/sentinel-2-l2a/{item_id}/B04.tif",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            }
        },
    }


def build_world(root: Path, n_items: int = 30, with_wms: bool = True) -> Path:
    (root / "stac").mkdir(parents=True)
    with layout.items_path(root).open("w") as f:
        for i in range(n_items):
            f.write(json.dumps(make_item(i)) + "\n")
    collection = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "sentinel-2-l2a",
        "description": "Demo Sentinel-2 L2A (from collections.json)",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[-5, 41, 10, 51]]},
            "temporal": {"interval": [["2020-01-01T00:00:00Z", None]]},
        },
        "links": [
            {"rel": "license", "href": "https://example.org/license"},
            {"rel": "self", "href": "http://wrong.example/collections/sentinel-2-l2a"},
        ],
    }
    layout.collections_path(root).write_text(json.dumps([collection]))
    if with_wms:
        for i, item_id in enumerate(COG_IDS):
            write_cog(layout.files_dir(root) / "sentinel-2-l2a" / item_id / "B04.tif", seed=i)
        sources = []
        for city in CITY_ORIGINS:
            relative = f"files/ign/ortho_2021/{city}.tif"
            write_ortho(root / relative, city)
            sources.append({"path": relative, "band_indexes": [1, 2, 3]})
        layers = {
            "layers": [
                {
                    "name": LAYER,
                    "title": "Orthophotos 2021",
                    "abstract": "Synthetic test ortho",
                    "year": 2021,
                    "bands": ["R", "G", "B"],
                    "sources": sources,
                }
            ]
        }
        layout.wms_layers_path(root).parent.mkdir(parents=True)
        layout.wms_layers_path(root).write_text(json.dumps(layers))
    return root


def getmap(
    info: ServerInfo,
    bbox: tuple[float, ...],
    width: int,
    height: int,
    fmt: str = "image/png",
    layer: str = LAYER,
    crs: str = "EPSG:2154",
) -> requests.Response:
    # Mixed-case parameter names on purpose: WMS names are case-insensitive.
    params = {
        "SERVICE": "WMS",
        "version": "1.3.0",
        "Request": "GetMap",
        "layers": layer,
        "STYLES": "",
        "crs": crs,
        "BBOX": ",".join(str(v) for v in bbox),
        "WIDTH": width,
        "height": height,
        "FORMAT": fmt,
    }
    return requests.get(info.wms_url, params=params, timeout=30)


def decode(content: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a WMS PNG has no georeferencing
        with MemoryFile(content) as mem, mem.open() as ds:
            return ds.read()


def search_ids(info: ServerInfo, limit: int) -> list[str]:
    client = Client.open(info.stac_url, modifier=planetary_computer.sign_inplace)
    return [item.id for item in client.search(**SEARCH, limit=limit).items()]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def info(world: Path) -> ServerInfo:
    port, backend_port = free_ports(2)
    started = control.start(world, port=port, backend_port=backend_port)
    yield started
    control.stop(world)


@pytest.fixture(autouse=True)
def no_faults_after(request: pytest.FixtureRequest) -> None:
    """Every test leaves the server without faults (only for tests that use the server)."""
    running = request.getfixturevalue("info") if "info" in request.fixturenames else None
    yield
    if running is not None:
        control.set_faults(running, Faults())


# -------------------------------------------------------------------------------------- STAC


def test_stac_search_pages_through_gateway(info: ServerInfo) -> None:
    control.reset_stats(info)
    client = Client.open(info.stac_url, modifier=planetary_computer.sign_inplace)
    items = list(client.search(**SEARCH, limit=4).items())

    assert len(items) == N_MATCHING
    assert len({item.id for item in items}) == N_MATCHING
    for item in items:
        assert item.assets["B04"].href == f"{info.files_url}/sentinel-2-l2a/{item.id}/B04.tif"
        assert item.get_self_href().startswith(info.stac_url)
    # 26 items by 4: 7 pages, every next link followed through the gateway.
    assert control.get_stats(info)["requests"]["stac_search"] >= 7


def test_stac_get_search_is_translated_for_rustac(info: ServerInfo) -> None:
    # rustac's own GET /search fails on bbox; the gateway translates GET into POST and back.
    client = Client.open(info.stac_url, modifier=planetary_computer.sign_inplace)
    ids = [item.id for item in client.search(**SEARCH, limit=5, method="GET").items()]
    assert len(ids) == len(set(ids)) == N_MATCHING
    search_url = f"{info.stac_url}/search"
    page = requests.get(search_url, params={"bbox": "1.3,43.5,1.6,43.7", "limit": 5}, timeout=10)
    next_link = next(link for link in page.json()["links"] if link["rel"] == "next")
    assert next_link["method"] == "GET" and next_link["href"].startswith(f"{info.stac_url}/search?")
    assert requests.get(search_url, params={"bbox": "1,2,x"}, timeout=10).status_code == 400


def test_search_params_roundtrip() -> None:
    query = (
        "bbox=1.3,43.5,1.6,43.7&collections=a,b&limit=5&skip=10"
        "&datetime=2021-01-01T00:00:00Z/..&sortby=-properties.datetime"
    )
    params = gateway_stac.search_params_from_query(query)
    assert params["bbox"] == [1.3, 43.5, 1.6, 43.7] and params["collections"] == ["a", "b"]
    assert params["limit"] == 5
    assert params["sortby"] == [{"field": "properties.datetime", "direction": "desc"}]
    assert gateway_stac.search_params_from_query(gateway_stac.search_query_from_params(params)) == params


def test_collections_come_from_collections_json(info: ServerInfo) -> None:
    client = Client.open(info.stac_url)
    collection = client.get_collection("sentinel-2-l2a")
    assert collection.description == "Demo Sentinel-2 L2A (from collections.json)"
    assert collection.get_self_href() == f"{info.stac_url}/collections/sentinel-2-l2a"
    assert collection.get_single_link("license").href == "https://example.org/license"
    assert requests.get(f"{info.stac_url}/collections/nope", timeout=10).status_code == 404


# ------------------------------------------------------------------------------------- files


def test_cog_window_over_vsicurl_reads_only_the_window(info: ServerInfo, world: Path) -> None:
    item_id = COG_IDS[1]
    local = layout.files_dir(world) / "sentinel-2-l2a" / item_id / "B04.tif"
    window = Window(256, 128, 128, 128)
    with rasterio.open(local) as ds:
        expected = ds.read(1, window=window)

    control.reset_stats(info)
    url = f"/vsicurl/{info.files_url}/sentinel-2-l2a/{item_id}/B04.tif"
    # This COG is read over HTTP by this test only, so GDAL's cache cannot hide requests.
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(url) as ds:
        assert ds.crs.to_epsg() == 32631
        got = ds.read(1, window=window)

    np.testing.assert_array_equal(got, expected)
    stats = control.get_stats(info)
    assert stats["requests"]["files"] >= 1
    assert 0 < stats["file_bytes"] < local.stat().st_size / 2


def test_file_ranges_head_and_errors(info: ServerInfo, world: Path) -> None:
    relative = f"sentinel-2-l2a/{COG_IDS[0]}/B04.tif"
    local = (layout.files_dir(world) / relative).read_bytes()
    size = len(local)
    url = f"{info.files_url}/{relative}"

    head = requests.head(url, timeout=10)
    assert head.status_code == 200 and head.headers["Accept-Ranges"] == "bytes"
    assert int(head.headers["Content-Length"]) == size and head.content == b""

    part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == local[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{size}"
    tail = requests.get(url, headers={"Range": "bytes=-10"}, timeout=10)
    assert tail.status_code == 206 and tail.content == local[-10:]
    open_end = requests.get(url, headers={"Range": f"bytes={size - 5}-"}, timeout=10)
    assert open_end.content == local[-5:]
    beyond = requests.get(url, headers={"Range": f"bytes={size}-"}, timeout=10)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
    assert requests.get(url, timeout=10).content == local
    assert requests.get(f"{info.files_url}/missing.tif", timeout=10).status_code == 404

    # Traversal: sent raw, because requests would normalise the dot segments away.
    for raw_path in ("/files/../stac/items.ndjson", "/files/%2e%2e/stac/items.ndjson"):
        conn = http.client.HTTPConnection(info.host, info.port, timeout=10)
        conn.request("GET", raw_path)
        assert conn.getresponse().status == 403
        conn.close()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=9-2", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert gateway_files.parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0"])
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(gateway_files.RangeNotSatisfiable):
        gateway_files.parse_range(header, 100)


# --------------------------------------------------------------------------------------- WMS


def test_wms_capabilities_lists_the_layer(info: ServerInfo) -> None:
    response = requests.get(
        info.wms_url, params={"service": "WMS", "request": "GetCapabilities"}, timeout=10
    )
    assert response.status_code == 200 and "xml" in response.headers["Content-Type"]
    root = ET.fromstring(response.content)
    assert root.tag == "{http://www.opengis.net/wms}WMS_Capabilities"
    assert root.get("version") == "1.3.0"
    assert root.find("w:Service/w:MaxWidth", WMS_NS).text == "4096"
    assert root.find("w:Service/w:MaxHeight", WMS_NS).text == "4096"
    assert root.find("w:Service/w:LayerLimit", WMS_NS).text == "1"
    formats = {f.text for f in root.findall("w:Capability/w:Request/w:GetMap/w:Format", WMS_NS)}
    assert {"image/png", "image/tiff", "image/jpeg"} <= formats

    layer = next(
        e
        for e in root.iter("{http://www.opengis.net/wms}Layer")
        if e.findtext("w:Name", namespaces=WMS_NS) == LAYER
    )
    assert layer.findtext("w:Title", namespaces=WMS_NS) == "Orthophotos 2021"
    assert {c.text for c in layer.findall("w:CRS", WMS_NS)} >= {"EPSG:2154", "EPSG:4326"}
    # Shaped like the Géoplateforme's: a geographic box and an EPSG:3857 one, no Lambert-93 box.
    assert [b.get("CRS") for b in layer.findall("w:BoundingBox", WMS_NS)] == ["EPSG:3857"]
    box = layer.find("w:BoundingBox[@CRS='EPSG:3857']", WMS_NS)
    expected = transform_bounds("EPSG:2154", "EPSG:3857", 574000, 6279800, 574600, 6280000, densify_pts=21)
    assert [float(box.get(k)) for k in ("minx", "miny", "maxx", "maxy")] == pytest.approx(expected, abs=1e-5)
    geo = layer.find("w:EX_GeographicBoundingBox", WMS_NS)
    assert 1.43 < float(geo.findtext("w:westBoundLongitude", namespaces=WMS_NS)) < 1.45
    # 1 m sources: the finest pixel served, over the OGC 0.28 mm pixel.
    assert float(layer.findtext("w:MinScaleDenominator", namespaces=WMS_NS)) == pytest.approx(1 / 0.00028)


def test_wms_getmap_native_resolution_is_exact(info: ServerInfo) -> None:
    x0, y0 = CITY_ORIGINS["toulouse"]
    # Columns 10..59, rows 100..149 of the Toulouse ortho, one output pixel per source pixel.
    before = control.get_stats(info)["wms_bytes"]
    response = getmap(info, (x0 + 10, y0 - 150, x0 + 60, y0 - 100), width=50, height=50)
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    assert control.get_stats(info)["wms_bytes"] - before == len(response.content)  # the scale plan's bytes read
    assert response.content.startswith(b"\x89PNG")
    image = decode(response.content)
    assert image.shape == (3, 50, 50)
    np.testing.assert_array_equal(image, ortho_array("toulouse")[:3, 100:150, 10:60])


def test_wms_getmap_half_resolution_across_cities(info: ServerInfo) -> None:
    x0, y0 = CITY_ORIGINS["toulouse"]
    # 2 m pixels from 100 m west of Toulouse to 100 m east of Muret: 400 x 100 pixels.
    response = getmap(info, (x0 - 100, y0 - 200, x0 + 700, y0), width=400, height=100)
    image = decode(response.content).astype(float)
    assert image.shape == (3, 100, 400)
    # Averages of 2x2 source pixels: column c of Toulouse is output column 50 + c // 2.
    expected_cols = np.arange(0, ORTHO_SIZE, 2) + 0.5
    np.testing.assert_allclose(image[0, 30, 50:150], expected_cols, atol=1)
    np.testing.assert_allclose(image[1, 50:100, 60], np.arange(100, 200, 2) + 0.5, atol=1)
    assert (image[2, :, 50:150] == CITY_CONSTANT["toulouse"]).all()
    assert (image[2, :, 250:350] == CITY_CONSTANT["muret"]).all()
    # Outside both cities: 0.
    assert (
        (image[:, :, :50] == 0).all()
        and (image[:, :, 150:250] == 0).all()
        and (image[:, :, 350:] == 0).all()
    )


def test_wms_getmap_geotiff_is_georeferenced(info: ServerInfo) -> None:
    x0, y0 = CITY_ORIGINS["muret"]
    bbox = (x0, y0 - 64, x0 + 64, y0)
    response = getmap(info, bbox, width=32, height=32, fmt="image/tiff")
    with MemoryFile(response.content) as mem, mem.open() as ds:
        assert ds.crs.to_epsg() == 2154
        assert ds.transform.almost_equals(Affine(2.0, 0, bbox[0], 0, -2.0, bbox[3]))
        assert (ds.read(3) == CITY_CONSTANT["muret"]).all()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"layer": "NOPE"}, "LayerNotDefined"),
        ({"crs": "EPSG:3857"}, "InvalidCRS"),
        ({"width": 5000}, "InvalidParameterValue"),
        ({"fmt": "image/gif"}, "InvalidFormat"),
    ],
)
def test_wms_errors_are_service_exceptions(info: ServerInfo, change: dict, code: str) -> None:
    args = {"bbox": (574000, 6279900, 574100, 6280000), "width": 10, "height": 10, **change}
    response = getmap(info, **args)
    assert response.status_code == 400
    report = ET.fromstring(response.content)
    assert report.tag == "{http://www.opengis.net/ogc}ServiceExceptionReport"
    assert report.find("ogc:ServiceException", OGC_NS).get("code") == code


# ------------------------------------------------------------------------------------ faults


def test_fault_429_has_retry_after(info: ServerInfo) -> None:
    control.set_faults(info, {"status_429_every": 2, "retry_after_s": 3, "routes": ["files"]})
    url = f"{info.files_url}/sentinel-2-l2a/{COG_IDS[0]}/B04.tif"
    assert requests.head(url, timeout=10).status_code == 200
    limited = requests.head(url, timeout=10)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    assert requests.get(url, headers={"Range": "bytes=0-9"}, timeout=10).status_code == 206
    body = requests.get(url, headers={"Range": "bytes=0-9"}, timeout=10)
    assert body.status_code == 429 and body.text == "Too many requests. Try again in 3 seconds"
    # Other routes are not in scope.
    assert requests.get(f"{info.stac_url}/", timeout=10).status_code == 200
    assert control.get_stats(info)["faults"]["status_429"] >= 2


def test_fault_503_only_on_scoped_routes(info: ServerInfo) -> None:
    control.set_faults(info, Faults(status_503_every=1, routes=["wms"]))
    params = {"SERVICE": "WMS", "REQUEST": "GetCapabilities"}
    assert requests.get(info.wms_url, params=params, timeout=10).status_code == 503
    assert requests.get(f"{info.stac_url}/", timeout=10).status_code == 200
    assert control.get_stats(info)["requests"]["wms_capabilities"] >= 1  # admin never faulted


def test_fault_drop_closes_the_connection(info: ServerInfo) -> None:
    control.set_faults(info, Faults(drop_every=1, routes=["stac"]))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{info.stac_url}/", timeout=10)
    assert control.get_stats(info)["faults"]["drop"] >= 1


def test_fault_truncate_sends_half_the_body(info: ServerInfo, world: Path) -> None:
    relative = f"sentinel-2-l2a/{COG_IDS[0]}/B04.tif"
    size = (layout.files_dir(world) / relative).stat().st_size
    control.set_faults(info, Faults(truncate_every=1))
    conn = http.client.HTTPConnection(info.host, info.port, timeout=10)
    conn.request("GET", f"/files/{relative}")
    response = conn.getresponse()
    assert int(response.getheader("Content-Length")) == size
    with pytest.raises(http.client.IncompleteRead) as excinfo:
        response.read()
    assert len(excinfo.value.partial) == size // 2 < size
    conn.close()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # what requests users see
        requests.get(f"{info.files_url}/{relative}", timeout=10)


def test_fault_omit_next_stops_paging(info: ServerInfo) -> None:
    control.set_faults(info, Faults(omit_next=True))
    assert len(search_ids(info, limit=4)) == 4


def test_fault_duplicate_items_repeats_ids_across_pages(info: ServerInfo) -> None:
    control.set_faults(info, Faults(duplicate_items=True))
    ids = search_ids(info, limit=4)
    assert len(set(ids)) == N_MATCHING  # nothing lost...
    assert len(ids) == N_MATCHING + 6  # ...and each of the 6 later pages repeats one item
    body = {
        "bbox": SEARCH["bbox"],
        "datetime": "2021-01-01T00:00:00Z/2021-12-31T23:59:59Z",
        "limit": 4,
        "skip": 4,
    }
    response = requests.post(f"{info.stac_url}/search", json=body, timeout=10)
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["numberReturned"] == len(page["features"]) == 5
    assert page["features"][0]["id"] == ids[3]


def test_faults_roundtrip_and_validation(info: ServerInfo) -> None:
    applied = control.set_faults(info.admin_url, {"drop_every": 5, "routes": ["files"]})
    assert applied == Faults(drop_every=5, routes=["files"])
    assert requests.get(f"{info.admin_url}/faults", timeout=10).json()["drop_every"] == 5
    bad = requests.post(f"{info.admin_url}/faults", json={"drop_evry": 1}, timeout=10)
    assert bad.status_code == 400 and "drop_evry" in bad.text


# --------------------------------------------------------------------------------- lifecycle


def test_lifecycle_start_ensure_up_stop(tmp_path: Path) -> None:
    root = build_world(tmp_path / "small", n_items=3, with_wms=False)
    port, backend_port = free_ports(2)

    # A port taken by something else is a clear error naming it.
    (taken,) = free_ports(1)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        with pytest.raises(ServiceError, match=f"127.0.0.1:{taken}"):
            control.start(root, port=taken, backend_port=backend_port)

    results: list[ServerInfo] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(control.ensure_up(root, "127.0.0.1", port, backend_port))
        )
        for _ in range(2)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        again = control.ensure_up(root, "127.0.0.1", port, backend_port)
        assert len(results) == 2 and results[0].pid == results[1].pid == again.pid
        assert control.read_server_json(root) == again
        assert requests.get(f"{again.stac_url}/search", timeout=10).json()["numberReturned"] == 3
        with pytest.raises(ServiceError, match="already runs"):
            control.start(root, port=port, backend_port=backend_port)
    finally:
        assert control.stop(root) is True
    assert control.stop(root) is False
    assert not control.server_json_path(root).exists()
    assert port_is_free(port) and port_is_free(backend_port)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/_admin/health", timeout=5)
    # The same ports can serve again right away.
    restarted = control.start(root, port=port, backend_port=backend_port)
    try:
        assert restarted.pid != again.pid
    finally:
        control.stop(root)
