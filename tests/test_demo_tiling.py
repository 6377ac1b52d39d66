"""The demo world's tile grids are the real ones: MGRS ids and origins, WRS-2 centres, WorldCover names.

Checked against the recorded Planetary Computer items (../shared/fixtures) and the tiles the demo
cities are known to lie in.
"""

from __future__ import annotations

import json

import pytest
from pyproj import Transformer

from tests.conftest import FIXTURES
from xstars.demo import tiling


def _fixture(collection: str) -> list[dict]:
    if not FIXTURES.exists():
        pytest.skip(f"real Planetary Computer fixtures not found at {FIXTURES}")
    features = json.loads((FIXTURES / f"{collection}.items.json").read_text())["features"]
    return [f for f in features if not any(k.startswith("earthsearch:") for k in f["properties"])]


def test_sentinel2_tile_of_the_recorded_item_has_its_id_origin_and_size() -> None:
    items = [i for i in _fixture("sentinel-2-l2a") if i["properties"]["s2:mgrs_tile"] == "58VFH"]
    assert items
    for item in items:
        b10 = item["assets"]["B04"]
        transform, shape = b10["proj:transform"], b10["proj:shape"]
        epsg = item["properties"].get("proj:epsg") or int(str(item["properties"]["proj:code"]).split(":")[1])
        zone = epsg - 32600
        # Any point of the tile's own 100 km square gives the tile back.
        tile = tiling.s2_tile_at(zone, transform[2] + 50_000, transform[5] - 50_000)
        assert tile.tile_id == "58VFH" and tile.crs == f"EPSG:{epsg}"
        assert (tile.xmin, tile.ymax) == (transform[2], transform[5]) == (600000, 6300000)
        assert tile.shape(transform[0]) == tuple(shape) == (10980, 10980)
        assert tile.shape(20) == (5490, 5490) and tile.shape(60) == (1830, 1830)
        # And the tiles holding the item's centre include it.
        lon, lat = (item["bbox"][0] + item["bbox"][2]) / 2, (item["bbox"][1] + item["bbox"][3]) / 2
        assert "58VFH" in {t.tile_id for t in tiling.s2_tiles_covering(lon, lat, lon, lat)}


@pytest.mark.parametrize(("lon", "lat", "expected"), [
    (1.4442, 43.6047, ["31TCJ"]),                # Toulouse
    (-0.5792, 44.8378, ["30TXQ", "31TBK"]),      # Bordeaux: zone 30, and zone 31's westmost tile
    (4.8357, 45.7640, ["31TFL"]),                # Lyon
    (6.002, 45.90, ["31TGL", "32TKR"]),          # the demo's border city, in 32N
])
def test_the_demo_cities_lie_in_their_real_tiles(lon: float, lat: float, expected: list[str]) -> None:
    d = 0.015
    tiles = tiling.s2_tiles_covering(lon - d, lat - d, lon + d, lat + d)
    assert [t.tile_id for t in tiles] == expected
    assert tiling.utm_zone(lon) == int(expected[0][:2]) or tiling.utm_zone(lon) == int(expected[-1][:2])
    for tile in tiles:
        x, y = Transformer.from_crs("EPSG:4326", tile.crs, always_xy=True).transform(lon, lat)
        xmin, ymin, xmax, ymax = tile.bounds
        assert xmin < x < xmax and ymin < y < ymax and xmax - xmin == ymax - ymin == 109_800
        assert tile.xmin % 100_000 == 0 and tile.ymax % 100_000 == 0


def test_neighbouring_tiles_overlap_by_9800_m() -> None:
    west, east = tiling.s2_tile_at(31, 350_000, 4_850_000), tiling.s2_tile_at(31, 450_000, 4_850_000)
    assert (west.tile_id, east.tile_id) == ("31TCJ", "31TDJ")
    assert west.bounds[2] - east.bounds[0] == 9_800
    # A place in that strip is in both tiles.
    lon, lat = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True).transform(405_000, 4_850_000)
    assert [t.tile_id for t in tiling.s2_tiles_covering(lon, lat, lon, lat)] == ["31TCJ", "31TDJ"]


def test_square_letters_follow_the_standard_lettering() -> None:
    # Column sets A-H / J-R / S-Z by zone % 3; rows A-V offset by 5 in even zones.
    assert tiling.square_letters(31, 350_000, 4_850_000) == "CJ"
    assert tiling.square_letters(30, 650_000, 4_950_000) == "XQ"
    assert tiling.square_letters(32, 250_000, 5_050_000) == "KR"
    assert tiling.square_letters(58, 650_000, 6_250_000) == "FH"


def test_wrs2_centres_match_the_recorded_landsat_scenes() -> None:
    for item in _fixture("landsat-c2-l2"):
        path, row = int(item["properties"]["landsat:wrs_path"]), int(item["properties"]["landsat:wrs_row"])
        ring = item["geometry"]["coordinates"][0][:-1]
        lon = sum(p[0] for p in ring) / len(ring)
        lat = sum(p[1] for p in ring) / len(ring)
        scene = tiling.wrs2_scene(path, row)
        assert abs(scene.centre[0] - lon) < 0.15 and abs(scene.centre[1] - lat) < 0.15, (path, row, scene.centre)
        epsg = item["properties"].get("proj:epsg")
        assert scene.crs == f"EPSG:{epsg}", (path, row)  # the zone of the scene's centre, as USGS
        assert scene.contains(lon, lat)


def test_landsat_scenes_have_the_size_and_footprint_of_the_recorded_ones() -> None:
    """A full-size WRS-2 scene: the recorded items' footprints are about 185 x 198 km (36,700 km2)
    and their 30 m grids 7,600-7,800 px on each side; the demo's scene of the same path/row
    within 3 % of both."""
    from shapely.geometry import Polygon

    from xstars.demo.scenes import landsat_scene_grid

    for item in _fixture("landsat-c2-l2"):
        props = item["properties"]
        scene = tiling.wrs2_scene(int(props["landsat:wrs_path"]), int(props["landsat:wrs_row"]))
        to_utm = Transformer.from_crs("EPSG:4326", scene.crs, always_xy=True)
        recorded = Polygon([to_utm.transform(*p[:2]) for p in item["geometry"]["coordinates"][0]])
        demo = Polygon([to_utm.transform(*p) for p in scene.corners_lonlat()])
        assert abs(demo.area / recorded.area - 1) < 0.03, (item["id"], demo.area / 1e6, recorded.area / 1e6)
        rows, cols = item["assets"]["red"].get("proj:shape") or props["proj:shape"]
        grid = landsat_scene_grid(scene)
        assert abs(grid.shape[0] / rows - 1) < 0.03 and abs(grid.shape[1] / cols - 1) < 0.03, (
            item["id"], grid.shape, (rows, cols))


def test_landsat_scene_of_a_city_can_be_in_another_zone_than_its_sentinel2_tile() -> None:
    d = 0.015
    lon, lat = 6.002, 45.90
    scenes = tiling.wrs2_scenes_covering(lon - d, lat - d, lon + d, lat + d)
    assert [(s.path, s.row, s.zone) for s in scenes] == [(196, 28, 31)]
    assert tiling.utm_zone(lon) == 32


def test_worldcover_tiles_are_3_degrees_named_by_their_south_west_corner() -> None:
    assert tiling.worldcover_tile_name(4.8357, 45.764) == "N45E003"
    assert tiling.worldcover_tile_name(-0.5792, 44.8378) == "N42W003"
    assert tiling.worldcover_tile_origin("N45E003") == (3.0, 48.0)
    assert tiling.worldcover_tiles_covering(5.99, 45.89, 6.02, 45.91) == ["N45E003", "N45E006"]
    assert round(tiling.WORLDCOVER_TILE_DEG / tiling.WORLDCOVER_STEP_DEG) == 36000
