"""The catalog on the demo world's real tile geometry (issue 14): a city in zone 32N on the 31/32
border, a city seen by two zones, an orbit-edge scene, a label site on a WorldCover tile edge,
Landsat Tier 2. Against the real servers of the small demo world, nothing mocked."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from pyproj import Transformer
from shapely.geometry import box, shape

from tests.conftest import SMALL_DEMO
from tests.test_catalog import build_manifest, small_world_config
from xstars.demo import control, layout
from xstars.manifest import read_candidates
from xstars.sites import Site

BORDER = next(c for c in SMALL_DEMO["cities"] if c["name"] == "etercy")


@pytest.fixture(scope="module")
def tiles_manifest(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory):
    """The manifest of toulouse (orbit edge), bordeaux (two zones) and etercy (32N, tile edge) sites."""
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, sites={
        "cities": ["toulouse", "bordeaux", dict(BORDER)], "sites_per_city": 6,
        "split": {"method": "cities", "val_cities": [], "test_cities": ["bordeaux"]}})
    path = tmp_path_factory.mktemp("tiles_manifest") / "manifest.parquet"
    rows, _ = build_manifest(config, path)
    candidates = read_candidates(sorted(path.with_name("manifest.search").glob("shard-*[0-9].parquet")))
    by_site: dict[tuple[str, str], list] = defaultdict(list)
    for c in candidates:
        by_site[(c.site_id, c.sensor)].append(c)
    return {(r.site_id, r.sensor): r for r in rows}, by_site


def _items(root: Path) -> dict[str, dict]:
    return {i["id"]: i for i in map(json.loads, layout.items_path(root).read_text().splitlines())}


def _region(rows, region: str, sensor: str) -> list:
    return [r for (_, s), r in rows.items() if s == sensor and r.region == region]


def test_a_site_in_32n_gets_candidates_from_both_zones_and_the_best_covering_scene(tiles_manifest) -> None:
    rows, candidates = tiles_manifest
    border = _region(rows, "etercy", "s2")
    assert len(border) == 6
    for row in border:
        tiles = {c.item_id.split("_")[4] for c in candidates[(row.site_id, "s2")]}
        assert tiles == {"T31TGL", "T32TKR"}, tiles  # the site is in the zone-31 and the zone-32 tile
        assert row.status == "ok"
        best = min(c.invalid_fraction for c in candidates[(row.site_id, "s2")])
        assert row.invalid_fraction == best  # the scene that covers the footprint best, whichever zone
    # Both zones' scenes are read by the build: the selection takes either, per site.
    assert {r.item_id.split("_")[4] for r in border} <= {"T31TGL", "T32TKR"}
    # Landsat: the WRS-2 scene 196/028 is in zone 31 (its centre's), the S2 tile of the city in 32.
    for row in _region(rows, "etercy", "l8"):
        assert row.status == "ok" and "_196028_" in row.item_id


def test_a_city_in_two_zones_is_seen_by_both(tiles_manifest) -> None:
    rows, candidates = tiles_manifest
    for row in _region(rows, "bordeaux", "s2"):
        tiles = {c.item_id.split("_")[4] for c in candidates[(row.site_id, "s2")]}
        assert tiles == {"T30TXQ", "T31TBK"}


def test_an_orbit_edge_scene_covers_part_of_a_site_and_a_full_scene_is_chosen(tiles_manifest, demo_root: Path) -> None:
    rows, candidates = tiles_manifest
    items = _items(demo_root)
    edge_ids = {i for i, item in items.items() if item["collection"] == "sentinel-2-l2a" and "_T31TCJ_" in i
                and item["properties"]["s2:nodata_pixel_percentage"] > 1}
    assert len(edge_ids) == 1
    edge = items[next(iter(edge_ids))]
    to_l93 = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True)
    footprint_l93 = shape({"type": "Polygon", "coordinates": [[to_l93.transform(*p) for p in
                                                               edge["geometry"]["coordinates"][0]]]})
    partial = 0
    for row in _region(rows, "toulouse", "s2"):
        site = box(*row_bounds(row))
        outside = 1 - footprint_l93.intersection(site).area / site.area
        found = [c for c in candidates[(row.site_id, "s2")] if c.item_id == edge["id"]]
        if outside == 1:
            assert not found
            continue
        # The no-data fraction read from its SCL is the part of the footprint beyond the swath edge
        # (to a 20 m pixel column: 1/12 of a 240 m footprint).
        assert abs(found[0].nodata_fraction - outside) < 1 / 12 + 1e-6, (row.site_id, found[0], outside)
        if 0 < outside:
            partial += 1
            # The clearest scene of all (no cloud), but partial: a full scene is chosen.
            assert row.status == "ok" and row.item_id != edge["id"] and row.nodata_fraction == 0
    assert partial >= 1


def row_bounds(row) -> tuple[float, float, float, float]:
    """A manifest row's footprint in Lambert-93: its cell of the sites grid."""
    return Site(row.site_id, row.region, row.col, row.row, row.footprint_m, row.split).bounds


def test_a_label_site_on_a_worldcover_tile_edge_is_built_from_the_mosaic(tiles_manifest) -> None:
    rows, _ = tiles_manifest
    to_lonlat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    on_edge = []
    for row in _region(rows, "etercy", "labels"):
        west, south, east, north = row_bounds(row)
        lons = [to_lonlat.transform(x, y)[0] for x in (west, east) for y in (south, north)]
        if min(lons) < 6.0 < max(lons):
            on_edge.append(row)
            assert row.status == "ok"
            assert row.item_id == "ESA_WorldCover_10m_2021_v200_N45E003+ESA_WorldCover_10m_2021_v200_N45E006"
        else:
            assert row.item_id in {"ESA_WorldCover_10m_2021_v200_N45E003", "ESA_WorldCover_10m_2021_v200_N45E006"}
    assert on_edge
    # The 2020 edition (v100) is excluded by the config's item rule everywhere.
    assert not any("v100" in r.item_id for (_, s), r in rows.items() if s == "labels")


def test_tier2_landsat_scenes_are_ranked_after_tier1(tiles_manifest, demo_root: Path) -> None:
    rows, candidates = tiles_manifest
    items = _items(demo_root)
    t2_seen = 0
    for (site, sensor), row in rows.items():
        if sensor != "l8" or row.status != "ok":
            continue
        found = candidates[(site, "l8")]
        t2 = [c for c in found if items[c.item_id]["properties"]["landsat:collection_category"] == "T2"]
        t2_seen += bool(t2)
        # The T2 scene is the clearest of all (no cloud): still never taken while a T1 scene will do.
        assert items[row.item_id]["properties"]["landsat:collection_category"] == "T1"
        ranked = [items[i]["properties"]["landsat:collection_category"] for i in [row.item_id, *(f.item_id for f in row.fallbacks)]]
        assert ranked == sorted(ranked), ranked  # fallbacks: every T1 scene before a T2 one
    assert t2_seen
