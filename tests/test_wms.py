"""The WMS client against the Géoplateforme's recorded capabilities and the demo WMS (loopback)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from tests.conftest import free_port
from tests.loopback import Answer, capabilities_answer, serve
from xstars import acquire, catalog
from xstars.config import load_config
from xstars.demo import control, layout
from xstars.demo.gateway import GatewayServer, GatewayState
from xstars.errors import ConfigError, ServiceError
from xstars.remote import WmsClient, read_wms
from xstars.sensors import sensors_of
from xstars.sites import Site

REPO = Path(__file__).resolve().parents[1]
HTTP = {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 10}


def png(width: int, height: int, colour=(90, 120, 60)) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(ext=".png") as memfile:
            with memfile.open(driver="PNG", width=width, height=height, count=3, dtype="uint8") as image:
                image.write(np.broadcast_to(np.array(colour, dtype=np.uint8)[:, None, None], (3, height, width)))
            return memfile.read()


def recorded_geoplateforme(request) -> Answer:
    """The Géoplateforme as recorded in May 2024: its capabilities, and opaque images for GetMap."""
    params = {k.upper(): v for k, v in (p.split("=", 1) for p in request.query.split("&") if "=" in p)}
    if params.get("REQUEST") == "GetCapabilities":
        return capabilities_answer()
    return Answer(200, png(int(params["WIDTH"]), int(params["HEIGHT"])), {"Content-Type": "image/png"})


@pytest.fixture(scope="module")
def geoplateforme():
    with serve(recorded_geoplateforme) as served:
        yield served


def real_config(geoplateforme, **sensor) -> dict:
    """config.yaml's real build, its Géoplateforme on loopback (the recorded document); of the
    WMS sensors, only the aerial orthophotos (`ign`, with ``sensor``'s values)."""
    config = load_config(REPO / "config.yaml", {"catalogs": {"geoplateforme": {"url": f"{geoplateforme.url}/wms-r"}},
                                                "http": HTTP, "sensors": {"ign": sensor}})
    config["sensors"] = {name: cfg for name, cfg in config["sensors"].items()
                         if cfg["kind"] != "wms_layers" or name == "ign"}
    return config


def site_at(lon: float, lat: float, footprint_m: float = 2240.0) -> Site:
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True).transform(lon, lat)
    return Site("s", "c", math.floor(x / footprint_m), math.floor(y / footprint_m), footprint_m, "train")


# ====================================================================== the recorded document


def test_the_recorded_capabilities_are_read(geoplateforme) -> None:
    caps = WmsClient(real_config(geoplateforme)["catalogs"]["geoplateforme"], HTTP).capabilities()
    assert len(caps.layers) == 308
    assert (caps.layer_limit, caps.max_width, caps.max_height) == (2, 10000, 10000)
    ortho = caps.layers["ORTHOIMAGERY.ORTHOPHOTOS2020"]
    assert ortho.bounds_wgs84 == (-2.68142, 42.9454, 7.74363, 49.4512)
    assert ortho.min_scale_denominator == pytest.approx(1066.364791925)
    assert ortho.finest_gsd_m == pytest.approx(0.29858, abs=1e-5)  # 0.30 m, not BD ORTHO's native 0.20
    assert caps.layers["ORTHOIMAGERY.ORTHO-SAT.SPOT.2023"].finest_gsd_m == pytest.approx(1.19433, abs=1e-5)


def test_missing_layer_years_stop_the_catalog_with_one_error(geoplateforme) -> None:
    """config.yaml asks for 2021-2023; the recorded per-year layers stop at 2020."""
    config = real_config(geoplateforme)
    geoplateforme.requests.clear()
    with pytest.raises(ConfigError) as failure:
        catalog.search_shard(config, [site_at(2.35, 48.85)], 0, Path("unused.parquet"))
    message = str(failure.value)
    assert message.startswith(f"sensors.ign against the GetCapabilities of {geoplateforme.url}/wms-r: ")
    assert ("sensors.ign.layers[0].name 'ORTHOIMAGERY.ORTHOPHOTOS{year}' for sensors.ign.years 2021-2023: "
            "ORTHOIMAGERY.ORTHOPHOTOS2021, ORTHOIMAGERY.ORTHOPHOTOS2022, ORTHOIMAGERY.ORTHOPHOTOS2023 not served "
            "(it serves 2001-2020, nearest 2020)") in message
    assert ("sensors.ign.layers[1].name 'ORTHOIMAGERY.ORTHOPHOTOS.IRC.{year}' for sensors.ign.years 2021-2023: "
            "ORTHOIMAGERY.ORTHOPHOTOS.IRC.2021, ORTHOIMAGERY.ORTHOPHOTOS.IRC.2022, ORTHOIMAGERY.ORTHOPHOTOS.IRC.2023 "
            "not served (it serves 2012-2020, nearest 2020)") in message
    # Stopped before any search: one GetCapabilities, and no STAC request (the Planetary Computer
    # is not reachable from here: asking it would have been a ServiceError).
    assert [r.query for r in geoplateforme.requests] == ["SERVICE=WMS&VERSION=1.3.0&REQUEST=GetCapabilities"]


@pytest.mark.parametrize(("years", "gsd_m", "finest"), [
    ([2020], 0.28, r"ORTHOIMAGERY\.ORTHOPHOTOS(\.IRC\.)?2020 is served at: 0\.299 m at best \(MinScaleDenominator 1066\.36"),
    # The RGB layers before 2020 stop at 1:2132.73 (0.60 m), the IRC ones at 0.30 m.
    ([2019, 2020], 0.5, r"ORTHOIMAGERY\.ORTHOPHOTOS2019 is served at: 0\.597 m at best \(MinScaleDenominator 2132\.73"),
])
def test_a_gsd_finer_than_the_layers_are_served_at_is_a_config_error(geoplateforme, years, gsd_m, finest) -> None:
    config = real_config(geoplateforme, years=years, gsd_m=gsd_m)  # both divide the 2240 m footprint
    with pytest.raises(ConfigError, match=rf"sensors\.ign\.gsd_m {gsd_m:g} is finer than {finest} x the OGC "
                                          r"standard pixel of 0\.28 mm\)$"):
        catalog.search_shard(config, [site_at(2.35, 48.85)], 0, Path("unused.parquet"))


def test_a_gsd_the_layers_are_served_at_passes(geoplateforme) -> None:
    from xstars.remote import check_wms_sensor, wms_layer_problems

    sensor = sensors_of(real_config(geoplateforme, years=[2020], gsd_m=0.32))["ign"]
    caps = WmsClient(sensor.catalog_cfg, HTTP).capabilities()
    assert wms_layer_problems(sensor, caps) == []
    check_wms_sensor(sensor, caps)


def test_the_footprint_prefilter_uses_the_geographic_box(geoplateforme) -> None:
    """The recorded layers declare no Lambert-93 box: the 2020 layers' geographic box starts at
    2.68 W, so a site at Brest (4.49 W) is skipped without a GetMap, one in Paris is measured."""
    config = real_config(geoplateforme, years=[2020])
    sensor = sensors_of(config)["ign"]
    client = WmsClient(sensor.catalog_cfg, HTTP)
    layers = client.layers()
    geoplateforme.requests.clear()
    assert catalog.wms_items(sensor, site_at(-4.49, 48.39), "EPSG:2154", layers, client) == []
    assert geoplateforme.requests == []
    (item, nodata), = catalog.wms_items(sensor, site_at(2.35, 48.85), "EPSG:2154", layers, client)
    assert nodata == 0.0 and item["id"].startswith("ORTHOIMAGERY.ORTHOPHOTOS2020_")
    assert len(geoplateforme.requests) == 2  # one thumbnail per layer the bands come from (RGB, IRC)


def test_cli_lists_the_configured_layers_that_are_live(geoplateforme) -> None:
    def run(config: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xstars", "catalog", "wms-layers", "--config-json",
                               json.dumps(config)], capture_output=True, text=True, cwd=REPO, check=False)

    result = run(real_config(geoplateforme))
    assert "  sensors.ign.layers[0].name ORTHOIMAGERY.ORTHOPHOTOS{year}: years served 2001-2020" in result.stdout
    assert "    2021 ORTHOIMAGERY.ORTHOPHOTOS2021: missing" in result.stdout
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sensors.ign.layers[0].name")
    result = run(real_config(geoplateforme, years=[2019, 2020]))
    assert result.returncode == 0, result.stderr
    assert "    2020 ORTHOIMAGERY.ORTHOPHOTOS.IRC.2020: live, finest 0.299 m" in result.stdout


# ========================================================================= the demo WMS, limited


@pytest.fixture(scope="module")
def demo_layers(demo_root: Path) -> dict:
    """The demo world's layers.json, its source paths made absolute (served from another root)."""
    doc = json.loads(layout.wms_layers_path(demo_root).read_text())
    for layer in doc["layers"]:
        for source in layer["sources"]:
            source["path"] = str(demo_root / source["path"])
    return doc


def wms_world(root: Path, doc: dict) -> control.ServerInfo:
    """A demo WMS for ``doc`` (a layers.json), served in this process on a free loopback port."""
    layout.wms_layers_path(root).parent.mkdir(parents=True, exist_ok=True)
    layout.wms_layers_path(root).write_text(json.dumps(doc))
    port = free_port()
    gateway = GatewayServer(("127.0.0.1", port), GatewayState(root, "127.0.0.1", port, free_port()))
    threading.Thread(target=gateway.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return control.ServerInfo(host="127.0.0.1", port=port, backend_port=0, pid=0, root=root), gateway


@pytest.fixture
def limited_wms(tmp_path: Path, demo_layers: dict):
    """The demo WMS announcing (and enforcing) MaxWidth 100 and MaxHeight 70."""
    info, gateway = wms_world(tmp_path, demo_layers | {"service": {"max_width": 100, "max_height": 70}})
    yield info
    gateway.shutdown()
    gateway.server_close()


def demo_ign(demo_root: Path, info: control.ServerInfo, **sensor) -> tuple[dict, object]:
    config = load_config(REPO / "config.yaml", {"world": "demo", "demo": {"root": str(demo_root)},
                                                "catalogs": {"geoplateforme": {"url": info.wms_url}},
                                                "http": HTTP, "sensors": {"ign": sensor}})
    return config, sensors_of(config)["ign"]


def source_bounds(demo_layers: dict, name: str) -> tuple[float, ...]:
    """The Lambert-93 bounds of the easternmost source (city) of a layer."""
    import rasterio

    sources = next(layer for layer in demo_layers["layers"] if layer["name"] == name)["sources"]
    bounds = []
    for source in sources:
        with rasterio.open(source["path"]) as src:
            bounds.append(tuple(src.bounds))
    return max(bounds)


def test_a_getmap_over_the_limits_is_a_mosaic_of_tiles_equal_to_one_request(demo_root, demo_layers, demo_server,
                                                                             limited_wms) -> None:
    name = "ORTHOIMAGERY.ORTHOPHOTOS2021"
    left, _, _, top = source_bounds(demo_layers, name)
    grid = acquire.site_grid((left + 200, top - 440, left + 440, top - 200), 1.0, "EPSG:2154")
    margin = 20.0  # 280 x 280 pixels: 3 x 4 tiles of at most 100 x 70
    clients = {}
    for which, info in (("whole", demo_server), ("limited", limited_wms)):
        client = clients[which] = WmsClient(demo_ign(demo_root, info)[1].catalog_cfg, HTTP)
        clients[f"{which} href"] = client.getmap_url(name, grid.bounds, grid.width, grid.height)
    one = read_wms(clients["whole href"], grid, margin, clients["whole"], "one request")
    limited, href = clients["limited"], clients["limited href"]
    tiled = read_wms(href, grid, margin, limited, "tiled")
    assert (limited.capabilities().max_width, limited.capabilities().max_height) == (100, 70)
    assert control.get_stats(limited_wms)["requests"]["wms_getmap"] == 12
    assert tiled.data.shape == one.data.shape == (3, 280, 280)
    assert tiled.transform == one.transform and np.array_equal(tiled.data, one.data)
    assert one.data.std() > 10  # an image, not a fill
    # A client that did not split would have been refused by the service itself.
    with pytest.raises(ServiceError, match=r"280 x 280 pixels, .* serves at most 100 x 70"):
        limited.image(dict(parse_qsl(urlsplit(href).query)) | {"WIDTH": "280", "HEIGHT": "280"}, "one big GetMap")


# ============================================================================== opaque fills


@pytest.mark.parametrize(("fill", "fill_colours"), [
    ([255, 255, 255], None),   # opaque white (the ROK4 layers' unflown areas): the default catches it
    ([0, 0, 0], None),         # opaque black
    (None, [[0, 0, 0]]),       # transparent, white colour under it: only the alpha band tells
])
def test_unflown_areas_are_no_data_whatever_their_fill(demo_root, demo_layers, tmp_path: Path, fill,
                                                       fill_colours) -> None:
    """A 2021 layer covers toulouse and bordeaux: a footprint on the west edge of toulouse is inside
    the layer's box and partly outside the area flown, which the layer paints in its fill."""
    doc = json.loads(json.dumps(demo_layers))
    for layer in doc["layers"]:
        layer["fill"] = None if fill is None else fill[: len(layer["bands"])]
    info, gateway = wms_world(tmp_path, doc)
    try:
        config, sensor = demo_ign(demo_root, info, years=[2021], **({"fill_colours": fill_colours}
                                                                     if fill_colours else {}))
        left, bottom, _, top = source_bounds(doc, "ORTHOIMAGERY.ORTHOPHOTOS2021")
        # A footprint of the sites grid across the city's west edge, a good part on each side.
        footprint = next(f for f in (480, 400, 320, 240, 160) if 0.25 < left / f - math.floor(left / f) < 0.75)
        site = Site("s", "toulouse", math.floor(left / footprint), math.floor((bottom + top) / 2 / footprint),
                    footprint, "train")
        outside = (left - site.bounds[0]) / footprint
        client = WmsClient(sensor.catalog_cfg, HTTP)
        (item, nodata), = catalog.wms_items(sensor, site, "EPSG:2154", client.layers(), client)
        assert nodata == pytest.approx(outside, abs=1 / 16 + 1e-6)  # measured on a 16 px thumbnail
        tile = acquire.acquire_tile(sensor, item, site.bounds, config | {"build": config["build"] | {"margin_m": 0}},
                                    client)
        assert tile.invalid_fraction == pytest.approx(outside, abs=2 / site.footprint_m * sensor.gsd_m + 1e-6)
        assert not tile.valid[:, : math.floor(outside * tile.grid.width) - 1].any()
    finally:
        gateway.shutdown()
        gateway.server_close()
