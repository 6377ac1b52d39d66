"""The demo world looks, to the pipeline, like the real services (issue 2, 'Shown by').

Everything here goes through real components: the generated COGs, the STAC API served by
rustac behind the gateway, GDAL's /vsicurl/ over HTTP, and the WMS.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import planetary_computer
import pytest
import rasterio
import requests
from pystac_client import Client
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import from_bounds

from tests.conftest import FIXTURES, SMALL_DEMO
from xstars.coregister import estimate_shift
from xstars.demo import layout
from xstars.demo.generate import generate_world


def _items(root: Path) -> list[dict]:
    return [json.loads(line) for line in layout.items_path(root).read_text().splitlines()]


def _local(root: Path, href: str) -> Path:
    return layout.local_path(root, href)


def _city_window(root: Path, src, city: str | None = None) -> rasterio.windows.Window:
    """The window of a full-size product over a city's extent (the first the product holds, or ``city``):
    the rest of a demo product is nodata."""
    for meta in json.loads(layout.world_json(root).read_text())["cities"]:
        if city is not None and meta["name"] != city:
            continue
        west, south, east, north = transform_bounds("EPSG:2154", src.crs, *meta["bounds_l93"], densify_pts=21)
        b = src.bounds
        if west >= b.left and east <= b.right and south >= b.bottom and north <= b.top:
            return from_bounds(west, south, east, north, transform=src.transform).round_offsets().round_lengths()
    raise AssertionError(f"{src.name} holds no city of the world")


# ---------------------------------------------------------------- STAC schema vs real PC items

def _real(collection: str) -> list[dict]:
    if not FIXTURES.exists():
        pytest.skip(f"real Planetary Computer fixtures not found at {FIXTURES}")
    features = json.loads((FIXTURES / f"{collection}.items.json").read_text())["features"]
    # Keep the Planetary Computer's own schema (the fixture also holds a few Earth Search items).
    return [f for f in features if not any(k.startswith("earthsearch:") for k in f["properties"])]


@pytest.mark.parametrize("collection", ["sentinel-2-l2a", "landsat-c2-l2"])
def test_demo_items_use_the_real_property_and_asset_keys(demo_root: Path, collection: str) -> None:
    real = _real(collection)
    real_props = set().union(*(f["properties"] for f in real)) | {"proj:code"}  # projection ext. 2.0
    real_common = set.intersection(*(set(f["properties"]) for f in real)) - {"proj:epsg"}
    real_assets = set().union(*(f["assets"] for f in real)) | {"lwir11"}  # L2SP items carry lwir11
    demo = [i for i in _items(demo_root) if i["collection"] == collection]
    assert demo
    for item in demo:
        props = set(item["properties"])
        assert props <= real_props, f"{item['id']}: keys not in real items: {props - real_props}"
        assert real_common <= props, f"{item['id']}: real keys missing: {real_common - props}"
        assert ("proj:epsg" in props) != ("proj:code" in props)
        assert set(item["assets"]) <= real_assets, set(item["assets"]) - real_assets
        assert set(item) == set(real[0]), "top-level item keys differ from the real items"


def test_demo_catalogue_has_the_variations_a_client_must_handle(demo_root: Path) -> None:
    s2 = [i["properties"] for i in _items(demo_root) if i["collection"] == "sentinel-2-l2a"]
    assert {"proj:epsg", "proj:code"} <= set().union(*s2)
    platforms = {p["platform"] for p in s2}
    assert any(p[0].isupper() for p in platforms) and any(p[0].islower() for p in platforms)
    baselines = {p["s2:processing_baseline"] for p in s2}
    assert min(baselines) < "04.00" <= max(baselines)
    # A pre-2022 acquisition present twice: original baseline and reprocessed >= 04.00.
    by_acquisition: dict[tuple, set] = {}
    for p in s2:
        by_acquisition.setdefault((p["datetime"], p["s2:mgrs_tile"]), set()).add(p["s2:processing_baseline"])
    reprocessed = [(k, v) for k, v in by_acquisition.items() if len(v) > 1]
    assert reprocessed and all(k[0] < "2022" and min(v) < "04.00" <= max(v) for k, v in reprocessed)
    landsat = {i["properties"]["platform"] for i in _items(demo_root) if i["collection"] == "landsat-c2-l2"}
    assert landsat == {"landsat-8", "landsat-9"}


def test_reprocessed_duplicate_differs_by_exactly_the_baseline_offset(demo_root: Path) -> None:
    """DN(>= 04.00) = DN(< 04.00) + 1000: same reflectance once each is decoded by its baseline.

    Except where the old baseline clamped a negative reflectance (dark water plus noise) to DN 1:
    keeping those values is why ESA introduced the offset.
    """
    s2 = [i for i in _items(demo_root) if i["collection"] == "sentinel-2-l2a"]
    old = next(i for i in s2 if i["properties"]["s2:processing_baseline"] == "02.12")
    new = next(i for i in s2 if i["properties"]["datetime"] == old["properties"]["datetime"]
               and i["properties"]["s2:processing_baseline"] >= "04.00")
    with rasterio.open(_local(demo_root, old["assets"]["B04"]["href"])) as a, \
            rasterio.open(_local(demo_root, new["assets"]["B04"]["href"])) as b:
        window = _city_window(demo_root, a)
        dn_old, dn_new = a.read(1, window=window).astype(int), b.read(1, window=window).astype(int)
    nodata, clamped = dn_old == 0, dn_old == 1
    valid = ~nodata & ~clamped
    assert valid.mean() > 0.5
    np.testing.assert_array_equal(dn_new[valid] - 1000, dn_old[valid])
    assert (dn_new[nodata] == 0).all() and (dn_new[clamped] <= 1001).all()


def test_quality_layers_agree_with_rendered_clouds(demo_root: Path) -> None:
    """SCL cloud classes and qa_pixel cloud bits sit where the image is bright and white."""
    items = _items(demo_root)
    cloudy_s2 = max((i for i in items if i["collection"] == "sentinel-2-l2a"),
                    key=lambda i: i["properties"]["eo:cloud_cover"])
    with rasterio.open(_local(demo_root, cloudy_s2["assets"]["SCL"]["href"])) as s, \
            rasterio.open(_local(demo_root, cloudy_s2["assets"]["B02"]["href"])) as b:
        window = _city_window(demo_root, s)
        scl = s.read(1, window=window)
        blue = b.read(1, window=_city_window(demo_root, b), out_shape=scl.shape,
                      resampling=Resampling.average).astype(float)
    offset = 1000 if cloudy_s2["properties"]["s2:processing_baseline"] >= "04.00" else 0
    blue = (blue - offset) / 10000
    assert np.isin(scl, [8, 9]).mean() > 0.2
    assert np.median(blue[scl == 9]) > 0.4 > np.median(blue[np.isin(scl, [4, 5])])
    cloudy_l8 = max((i for i in items if i["collection"] == "landsat-c2-l2"),
                    key=lambda i: i["properties"]["eo:cloud_cover"])
    with rasterio.open(_local(demo_root, cloudy_l8["assets"]["qa_pixel"]["href"])) as q, \
            rasterio.open(_local(demo_root, cloudy_l8["assets"]["blue"]["href"])) as b:
        window = _city_window(demo_root, q)
        qa, dn = q.read(1, window=window), b.read(1, window=window).astype(float)
    refl = dn * 2.75e-5 - 0.2
    cloud = (qa >> 3) & 1 == 1
    clear = (qa >> 6) & 1 == 1
    assert cloud.any() and clear.any()
    assert np.median(refl[cloud]) > 0.4 > np.median(refl[clear & (dn > 0)])


# ---------------------------------------------------------------- known misregistration

#: Red reflectance per WorldCover class: the test's own, independent of the generator's spectra.
_RED_BY_CLASS = {10: 0.035, 20: 0.07, 30: 0.05, 40: 0.06, 50: 0.15, 60: 0.18, 80: 0.03, 90: 0.045}


def _reference_from_labels(root: Path, city: str, dst_transform, dst_crs, shape) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    for code, value in _RED_BY_CLASS.items():
        lut[code] = value
    with rasterio.open(layout.landcover_path(root, city)) as src:
        labels = lut[src.read(1)]
        out = np.zeros(shape, dtype=np.float32)
        reproject(labels, out, src_transform=src.transform, src_crs=src.crs, dst_transform=dst_transform,
                  dst_crs=dst_crs, resampling=Resampling.average)
    return out


def test_known_shifts_are_what_the_rasters_show(demo_root: Path) -> None:
    """Measure each scene's displacement against the label map; compare with truth/shifts.json."""
    shifts = json.loads(layout.shifts_path(demo_root).read_text())["scenes"]
    items = {f"{i['collection']}/{i['id']}": i for i in _items(demo_root)}
    layers = {layer["name"]: layer for layer in json.loads(layout.wms_layers_path(demo_root).read_text())["layers"]}
    checked = 0
    errors, clear = [], []
    for key, truth in shifts.items():
        quality = None
        if key not in items:  # a WMS source: <layer>/<city>
            layer, city = key.split("/")
            source = next(s for s in layers[layer]["sources"] if s["path"].endswith(f"/{city}.tif"))
            path = demo_root / source["path"]
        else:
            item = items[key]
            if item["properties"]["eo:cloud_cover"] > 50:
                continue
            s2 = item["collection"] == "sentinel-2-l2a"
            path = _local(demo_root, item["assets"]["B04" if s2 else "red"]["href"])
            quality = _local(demo_root, item["assets"]["SCL" if s2 else "qa_pixel"]["href"])
        with rasterio.open(path) as src:
            # A WMS source is the city's extent; a product is full size, the city one window of it.
            window = _city_window(demo_root, src, truth["city"]) if quality is not None else None
            image = src.read(1, window=window).astype(np.float32)
            transform = src.transform if window is None else src.window_transform(window)
            reference = _reference_from_labels(demo_root, truth["city"], transform, src.crs, image.shape)
        valid = image > 0
        if quality is not None:  # mask clouds and shadows with the product's own quality layer
            with rasterio.open(quality) as q:
                flags = q.read(1, window=_city_window(demo_root, q, truth["city"]), out_shape=image.shape,
                               resampling=Resampling.nearest)
            valid &= np.isin(flags, [4, 5, 6]) if s2 else ((flags >> 6) & 1 == 1) & ((flags >> 4) & 1 == 0)
        est = estimate_shift(reference, image, valid)
        # dx_px is eastwards (+columns); dy_px is northwards (-rows).
        errors.append(np.hypot(est.dx - truth["dx_px"], est.dy + truth["dy_px"]))
        clear.append(key not in items or items[key]["properties"]["eo:cloud_cover"] <= 5)
        checked += 1
    assert checked >= 20
    errors, clear = np.array(errors), np.array(clear)
    # Clear scenes (and the WMS sources) within a third of a pixel; a few partly cloudy Landsat and
    # Sentinel-2 scenes measure up to about a pixel off with this estimator (clouds over half a
    # 43-pixel city): the median over all stays small.
    assert np.median(errors) < 0.15 and errors[clear].max() < 0.35 and errors.max() < 1.5, errors.round(2)
    assert clear.sum() >= 20


# ---------------------------------------------------------------- served by real servers

@pytest.fixture
def sdk_on_the_gateway(demo_server, monkeypatch):
    """The Planetary Computer SDK's token requests sent to the demo gateway (PC_SDK_SAS_URL)."""
    from planetary_computer import sas
    from planetary_computer.settings import Settings

    monkeypatch.setenv("PC_SDK_SAS_URL", demo_server.token_url)
    Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()
    yield demo_server
    Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()


def test_pystac_client_searches_the_demo_api_like_the_planetary_computer(demo_root: Path, demo_server,
                                                                          sdk_on_the_gateway) -> None:
    client = Client.open(demo_server.stac_url, modifier=planetary_computer.sign_inplace)
    city = SMALL_DEMO["cities"][0]
    bbox = [city["lon"] - 0.001, city["lat"] - 0.001, city["lon"] + 0.001, city["lat"] + 0.001]
    search = client.search(collections=["sentinel-2-l2a"], bbox=bbox, datetime="2021-01-01/2022-12-31", limit=2)
    found = list(search.items())
    # rustac does not implement the query extension: the cloud filter is applied client-side,
    # which is what the catalog stage does for servers that do not conform to it.
    assert not client.conforms_to("QUERY")
    clear = sorted(i.id for i in found if i.properties["eo:cloud_cover"] < 20)
    expected = sorted(
        i["id"] for i in _items(demo_root)
        if i["collection"] == "sentinel-2-l2a" and "_T31TCJ_" in i["id"]
        and "2021" <= i["properties"]["datetime"][:4] <= "2022" and i["properties"]["eo:cloud_cover"] < 20)
    assert clear == expected and len(expected) >= 3
    assert len(found) > 2  # more than one page: `next` links were followed through the gateway
    # Blob storage hrefs, as the Planetary Computer's, signed by the SDK with the gateway's tokens.
    account, container = layout.BLOB_CONTAINERS["sentinel-2-l2a"]
    assert all(a.href.startswith(f"http://{account}.blob.core.windows.net/{container}/") and "&sig=" in a.href
               for i in found for a in i.assets.values())


def test_rasterio_reads_a_window_of_a_demo_cog_over_http(demo_root: Path, demo_server, sdk_on_the_gateway) -> None:
    item = next(i for i in _items(demo_root) if i["collection"] == "sentinel-2-l2a")
    local = _local(demo_root, item["assets"]["B08"]["href"])
    url = planetary_computer.sign(item["assets"]["B08"]["href"])  # a token of the gateway's
    with (
        # The blob host does not resolve: GDAL reads it through the gateway, as an HTTP proxy.
        rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", GDAL_HTTP_PROXY=demo_server.proxy),
        rasterio.open(f"/vsicurl/{url}") as remote,
        rasterio.open(local) as ref,
    ):
        window = _city_window(demo_root, ref)
        window = rasterio.windows.Window(window.col_off + 20, window.row_off + 30, 40, 24)
        assert (ref.read(1, window=window) > 0).mean() > 0.9
        np.testing.assert_array_equal(remote.read(1, window=window), ref.read(1, window=window))
        assert remote.crs == ref.crs and remote.transform == ref.transform


def test_wms_getmap_returns_the_requested_lambert93_box(demo_root: Path, demo_server) -> None:
    layers = json.loads(layout.wms_layers_path(demo_root).read_text())["layers"]
    layer = next(lay for lay in layers if lay["name"].startswith("ORTHOIMAGERY.ORTHOPHOTOS2"))
    source = demo_root / layer["sources"][0]["path"]
    with rasterio.open(source) as src:
        left, bottom, _right, _top = src.bounds
        box = (left + 200.0, bottom + 300.0, left + 328.0, bottom + 364.0)  # 128 x 64 m
        expected = src.read([1, 2, 3], window=from_bounds(*box, transform=src.transform))
    params = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": layer["name"], "STYLES": "",
              "CRS": "EPSG:2154", "BBOX": ",".join(map(str, box)), "WIDTH": expected.shape[2],
              "HEIGHT": expected.shape[1], "FORMAT": "image/png"}
    response = requests.get(demo_server.wms_url, params=params, timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("image/png")
    with rasterio.MemoryFile(io.BytesIO(response.content)) as mem, mem.open() as png:
        got = png.read()
    assert got.shape == expected.shape
    # Native resolution and pixel-aligned box: the service returns the source pixels.
    assert np.mean(np.abs(got.astype(int) - expected.astype(int))) < 1.0
    caps = requests.get(demo_server.wms_url, params={"SERVICE": "WMS", "REQUEST": "GetCapabilities"}, timeout=30)
    assert layer["name"] in caps.text and "EPSG:2154" in caps.text


# ---------------------------------------------------------------- determinism

def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "run" not in p.relative_to(root).parts}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    tiny = dict(SMALL_DEMO, extent_m=640, cities=SMALL_DEMO["cities"][:1])
    generate_world(tmp_path / "a", tiny)
    generate_world(tmp_path / "b", tiny)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) > 50
    generate_world(tmp_path / "c", dict(tiny, seed=tiny["seed"] + 1))
    assert _digest(tmp_path / "c") != a


def test_items_footprints_cover_their_city(demo_root: Path) -> None:
    world = json.loads(layout.world_json(demo_root).read_text())
    for city in world["cities"]:
        west, _south, east, _north = transform_bounds("EPSG:2154", "EPSG:4326", *city["bounds_l93"])
        mine = [i for i in _items(demo_root) if i["bbox"][0] <= city["lon"] <= i["bbox"][2]
                and i["bbox"][1] <= city["lat"] <= i["bbox"][3]]
        assert {i["collection"] for i in mine} == {"sentinel-2-l2a", "landsat-c2-l2", "esa-worldcover"}
        for i in mine:
            if i["collection"] != "esa-worldcover":  # a whole scene or tile over the city
                assert i["bbox"][0] <= west + 1e-6 and i["bbox"][2] >= east - 1e-6
        # WorldCover: the city's 3-degree tiles (two on a tile edge), each in both editions.
        touching = [i["id"] for i in _items(demo_root) if i["collection"] == "esa-worldcover"
                    and i["bbox"][0] < east and i["bbox"][2] > west]
        assert sorted(touching) == sorted(f"ESA_WorldCover_10m_{edition}_{tile}" for tile in city["worldcover_tiles"]
                                          for edition in ("2020_v100", "2021_v200"))
        assert len(city["worldcover_tiles"]) == (2 if city["name"] == "etercy" else 1)


def test_generation_on_two_threads_is_the_same_as_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strips of the ground truth and the bands of rows of the PSF, on two threads
    (xstars/demo/threads.py), give the same arrays bit for bit as one thread."""
    from scipy import ndimage

    from xstars.demo import threads
    from xstars.demo.landscape import CityGrid, make_ground_truth
    from xstars.demo.render import psf_blur

    grid = CityGrid("toulouse", 574_000.0, 6_280_000.0, 800.0, 0.5)  # 1600 px: 13 strips
    image = np.random.default_rng(3).random((1031, 517), dtype=np.float32)
    results = {}
    for workers in (1, 2):
        monkeypatch.setattr(threads, "WORKERS", workers)
        truth = make_ground_truth(np.random.default_rng(7), grid)
        results[workers] = (truth.material, truth.brightness, psf_blur(image, 2.3), psf_blur(image, 0.6))
    for one, two in zip(results[1], results[2], strict=True):
        np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(results[2][2], ndimage.gaussian_filter(image, 2.3, mode="nearest"))
    assert len(threads.row_chunks(1031, 2)) == 2
