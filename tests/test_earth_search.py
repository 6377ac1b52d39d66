"""Earth Search's Sentinel-2 L2A items (recorded from the real API) through the whole item path.

Earth Search serves the same scenes as the Planetary Computer, public and unsigned, under its own
asset keys (``blue``, ``red``, ``nir``, ``scl``...) and properties (``mgrs:*`` and ``grid:code``
for the tile, ``earthsearch:boa_offset_applied``, lower-case platforms). The recorded items are
served by the demo STAC server with their hrefs pointed at local COGs laid out on the items' own
tile grid, then searched, deduplicated, ranked over site footprints and read into tiles by the
pipeline's own code, with the sensor's catalogue switched to ``earth_search`` in config only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from tests.conftest import FIXTURES, free_port
from xstars import catalog
from xstars import items as stac_items
from xstars.acquire import acquire_tile
from xstars.config import load_config
from xstars.demo import control
from xstars.demo.layout import FILES_URL_PLACEHOLDER
from xstars.sensors import sensors_of
from xstars.sites import Site
from xstars.stac_search import StacSearcher

REPO = Path(__file__).resolve().parents[1]

#: Earth Search's asset key of each Sentinel-2 band, as its items name them (checked against
#: the recorded items' asset titles below, independently of config.yaml's table).
EARTH_SEARCH_KEYS = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
                     "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09",
                     "B11": "swir16", "B12": "swir22", "SCL": "scl", "visual": "visual"}
SCENE = "S2A_13TDE_20231008_0_L2A"  # MGRS 13TDE, baseline 05.09, UTM 13N (EPSG:32613)
#: The test's sites: 560 m footprints on the tile's 20 m grid (origin 399960, 4500000), UTM 13N.
CRS = "EPSG:32613"
FOOTPRINT_M = 560.0
SITE_CELLS = ((771, 7971), (772, 7971))  # (col, row): x = col * 560, y = row * 560
#: Local COGs cover this box around the sites (a tile is 109.8 km: only this much is written).
WINDOW = (431_520.0, 4_463_520.0, 433_440.0, 4_464_960.0)
CLOUDY_COLUMNS_M = 120  # SCL class 9 (high-probability cloud) over the first 120 m of the first site
CLOUD_EDGE_X = SITE_CELLS[0][0] * FOOTPRINT_M + CLOUDY_COLUMNS_M


def recorded_earth_search_items() -> list[dict]:
    features = json.loads((FIXTURES / "sentinel-2-l2a.items.json").read_text())["features"]
    return [f for f in features if "earthsearch:boa_offset_applied" in f["properties"]]


def band_dn(band: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The DN written for ``band`` at pixel centres (x, y): a ramp, distinct per band, above
    the 1000 offset of baselines 04.00 and later."""
    k = sorted(EARTH_SEARCH_KEYS).index(band)
    return (1500 + 100 * k + (x - WINDOW[0]) / 4 + (y - WINDOW[1]) / 8).astype("uint16")


def write_cog(path: Path, band: str, gsd: float) -> None:
    import rasterio
    from rasterio.transform import from_origin

    width, height = int((WINDOW[2] - WINDOW[0]) / gsd), int((WINDOW[3] - WINDOW[1]) / gsd)
    cx = WINDOW[0] + (np.arange(width) + 0.5) * gsd
    cy = WINDOW[3] - (np.arange(height) + 0.5) * gsd
    x, y = np.meshgrid(cx, cy)
    if band == "SCL":
        values = np.where(x < CLOUD_EDGE_X, 9, 4).astype("uint8")
        dtype = "uint8"
    else:
        values, dtype = band_dn(band, x, y), "uint16"
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=width, height=height, count=1, dtype=dtype, crs=CRS,
                       transform=from_origin(WINDOW[0], WINDOW[3], gsd, gsd), nodata=0, blocksize=256) as dst:
        dst.write(values, 1)


@pytest.fixture(scope="module")
def earth_search(tmp_path_factory):
    """The recorded Earth Search items on the demo server, the scene's hrefs pointing at local
    COGs, plus a reprocessed copy of the scene (baseline 05.10, sensing time 0.4 s later, as a
    reprocessing rounds it) that deduplication must prefer."""
    root = tmp_path_factory.mktemp("earth_search")
    items = recorded_earth_search_items()
    scene = next(i for i in items if i["id"] == SCENE)
    for band, key in EARTH_SEARCH_KEYS.items():
        if band == "visual":
            continue
        gsd = float(scene["assets"][key].get("gsd") or scene["assets"][key]["raster:bands"][0]["spatial_resolution"])
        write_cog(root / "files" / "sentinel-2-l2a" / SCENE / f"{key}.tif", band, gsd)
        scene["assets"][key]["href"] = f"{FILES_URL_PLACEHOLDER}/sentinel-2-l2a/{SCENE}/{key}.tif"
    reprocessed = copy.deepcopy(scene)
    reprocessed["id"] = SCENE.replace("_0_L2A", "_1_L2A")
    props = reprocessed["properties"]
    props["datetime"] = props["datetime"].replace("18:02:55.276", "18:02:55.676")
    props["s2:processing_baseline"], props["s2:generation_time"] = "05.10", "2024-02-01T00:00:00.000000Z"
    (root / "stac").mkdir()
    (root / "stac" / "items.ndjson").write_text("".join(json.dumps(f) + "\n" for f in [*items, reprocessed]))
    info = control.start(root, port=free_port(), backend_port=free_port())
    yield info, scene, reprocessed
    control.stop(root)


def earth_search_config(info: control.ServerInfo) -> dict:
    """The project's config with the Sentinel-2 sensor read from Earth Search (config only)."""
    return load_config(REPO / "config.yaml", {
        "catalogs": {"earth_search": {"url": info.stac_url}},
        "sensors": {"s2": {"catalog": "earth_search"}},
        "sites": {"crs": CRS, "footprint_m": FOOTPRINT_M},
        "build": {"margin_m": 0},
        "http": {"backoff_s": 0.01}})


def test_the_recorded_items_are_read_as_they_are() -> None:
    items = recorded_earth_search_items()
    assert len(items) >= 4
    s2 = sensors_of(load_config(REPO / "config.yaml", {"sensors": {"s2": {"catalog": "earth_search"}}}))["s2"]
    for item in items:
        props = item["properties"]
        # The keys the sensor asks for are those Earth Search serves; their titles name the band.
        for band in [*s2.bands, s2.mask_band]:
            key = s2.asset_key(band)
            assert key == EARTH_SEARCH_KEYS[band] and key in item["assets"], (item["id"], band)
            if "(band" in item["assets"][key]["title"]:  # newer items title the band only by its name
                assert f"(band {band[1:].lstrip('0')})" in item["assets"][key]["title"], (item["id"], band)
        # The tile from Earth Search's mgrs:* and grid:code (it has no s2:mgrs_tile).
        assert "s2:mgrs_tile" not in props
        assert stac_items.mgrs_tile(item) == props["grid:code"].removeprefix("MGRS-")
        assert stac_items.normalise_platform(props["platform"]) in ("sentinel-2a", "sentinel-2b")
        hemisphere = 6 if props["mgrs:latitude_band"] >= "N" else 7
        assert stac_items.item_crs(item) == f"EPSG:32{hemisphere}{props['mgrs:utm_zone']:02d}"
        # The offset follows the baseline (>= 04.00 here) and agrees with what the item declares
        # (raster:bands offset -0.1 = -1000 DN), whatever earthsearch:boa_offset_applied says.
        offset = stac_items.s2_offset_for_baseline(stac_items.processing_baseline(item))
        declared = item["assets"]["red"]["raster:bands"][0]
        assert offset / 10000 == pytest.approx(declared["offset"]) and declared["scale"] == 1e-4
    without = copy.deepcopy(items[0])
    del without["properties"]["s2:processing_baseline"]
    assert stac_items.processing_baseline(without) == stac_items.processing_baseline(items[0])  # from the product URI


def test_search_dedupe_rank_and_read_through_earth_search(earth_search) -> None:
    info, scene, reprocessed = earth_search
    config = earth_search_config(info)
    s2 = sensors_of(config)["s2"]
    searcher = StacSearcher(s2.catalog_cfg, config["http"], s2.catalog_name)
    searcher.check_collection(s2.collection, "sensors.s2.collection")
    window = catalog.SearchWindow("2023-10", stac_items.parse_time("2023-10-01T00:00:00Z"),
                                  stac_items.parse_time("2023-10-31T23:59:59Z"))
    sites = [Site(f"s_{c}_{r}", "test", c, r, FOOTPRINT_M, "train") for c, r in SITE_CELLS]
    bbox = catalog.to_wgs84(box(*WINDOW), CRS).bounds
    # The platform filter in the configured spelling matches Earth Search's lower-case one.
    found = searcher.search(s2.collection, bbox, window, group_id="g", platforms=["Sentinel-2A", "SENTINEL_2B"])
    assert {i["id"] for i in found} == {scene["id"], reprocessed["id"]}
    kept = stac_items.dedupe_s2_reprocessed(found)
    assert [i["id"] for i in kept] == [reprocessed["id"]]  # one acquisition: the higher baseline
    scene = next(i for i in found if i["id"] == scene["id"])  # as served: hrefs on the file server
    # Ranked over the footprints in the scene's own SCL (Earth Search key `scl`, 20 m).
    fractions = catalog.footprint_fractions(scene, s2, sites, CRS, config["http"])
    first, second = (fractions[s.site_id] for s in sites)
    assert first["nodata_fraction"] == 0 and second["nodata_fraction"] == 0
    assert first["cloud_fraction"] == round(CLOUDY_COLUMNS_M / FOOTPRINT_M, 6) and second["cloud_fraction"] == 0
    # Read into a tile: reflectance = (DN - 1000) / 10000 at the site's pixel centres.
    tile = acquire_tile(s2, scene, sites[1].bounds, config)
    assert tile.data.shape == (len(s2.bands), 56, 56) and tile.valid.all()
    gsd = s2.gsd_m
    xs = sites[1].bounds[0] + (np.arange(56) + 0.5) * gsd
    ys = sites[1].bounds[3] - (np.arange(56) + 0.5) * gsd
    x, y = np.meshgrid(xs, ys)
    red = s2.bands.index("B04")
    expected = (band_dn("B04", x, y).astype(np.float32) - 1000) / 10000
    np.testing.assert_allclose(tile.data[red], expected, atol=1e-6)
    cloudy = acquire_tile(s2, scene, sites[0].bounds, config)
    assert not cloudy.valid[:, : int(CLOUDY_COLUMNS_M / gsd)].any() and cloudy.valid[:, int(CLOUDY_COLUMNS_M / gsd):].all()
