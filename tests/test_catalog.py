"""The catalog stage against the demo world's real STAC API, files and WMS (nothing mocked)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SMALL_DEMO, free_port
from xstars import catalog, figures
from xstars import items as stac_items
from xstars.config import load_config
from xstars.demo import control
from xstars.errors import ConfigError, ServiceError
from xstars.manifest import MANIFEST_COLUMNS, Manifest, items_dir
from xstars.selection import summary
from xstars.sensors import sensors_of
from xstars.sites import Site, sample_sites, write_sites
from xstars.stac_search import StacSearcher

REPO = Path(__file__).resolve().parents[1]


def small_world_config(root: Path, info: control.ServerInfo, **overrides) -> dict:
    """The demo config shrunk to the tests' small world (1.28 km cities), on its server."""
    base = {
        "world": "demo",
        "demo": {**SMALL_DEMO, "root": str(root), "port": info.port, "stac_backend_port": info.backend_port},
        "sites": {
            "cities": ["toulouse", "bordeaux"],
            "footprint_m": 240,
            "city_radius_m": 360,
            "sites_per_city": 4,
            "split": {"method": "cities", "val_cities": [], "test_cities": ["bordeaux"]},
        },
        "catalog": {"search_shards": 1, "search_cell_m": 4800},
        "http": {"backoff_s": 0.01, "max_retries": 6},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(REPO / "config.yaml", base)


@pytest.fixture
def served(demo_root: Path, demo_server: control.ServerInfo):
    """The session's demo server with faults off and counters reset, before and after."""
    control.set_faults(demo_server, {})
    control.reset_stats(demo_server)
    yield demo_server
    control.set_faults(demo_server, {})


def build_manifest(config: dict, path: Path) -> tuple[list[dict], list[dict]]:
    return catalog.build_manifest(config, sample_sites(config), path)


# ------------------------------------------------------------------------------ the manifest


@pytest.fixture(scope="module")
def clean_manifest(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory) -> tuple[Path, list[dict]]:
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server)
    path = tmp_path_factory.mktemp("manifest") / "manifest.parquet"
    rows, _ = build_manifest(config, path)
    return path, rows


def test_manifest_has_one_row_per_site_and_sensor(clean_manifest, demo_root: Path) -> None:
    import geopandas as gpd

    path, _rows = clean_manifest
    frame = gpd.read_parquet(path)
    assert frame.crs.to_epsg() == 2154
    sensors = sensors_of(load_config(REPO / "config.yaml"))  # one row per site and configured sensor
    assert list(sensors) == ["s2", "l8", "ign", "spot", "labels"]
    assert len(frame) == 8 * len(sensors) and Counter(frame.sensor) == dict.fromkeys(sensors, 8)
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    ok = frame[frame.status == "ok"]
    assert ok.site_id.nunique() >= 6, frame[frame.status != "ok"].reason.unique()
    dropped = frame[frame.status != "ok"]
    assert (dropped.reason_code != "").all() and (dropped.reason_sensor != "").all()
    # The chosen items are real items of the world, stored once each, unsigned, with their assets.
    manifest = Manifest(path)
    items = {sensor: manifest.items(sensor).get(list(group.item_id)) for sensor, group in ok.groupby("sensor")}
    world_items = {json.loads(line)["id"] for line in (demo_root / "stac" / "items.ndjson").read_text().splitlines()}
    for row in ok.itertuples():
        item = items[row.sensor][row.item_id]
        assert item["id"] == row.item_id
        assert set(row.assets) <= set(item["assets"])
        if sensors[row.sensor].kind != "wms_layers":
            assert row.item_id in world_items
        else:
            assert "REQUEST=GetMap" in item["assets"]["rgb"]["href"] and "CRS=EPSG%3A2154" in item["assets"]["rgb"]["href"]
        assert row.invalid_fraction <= 0.2
    # S2: the reprocessed 2021 acquisition is never chosen at its old baseline.
    assert all(stac_items.processing_baseline(i) != "02.12" for i in items["s2"].values())
    # L8 only, never L9.
    assert all(i["properties"]["platform"] == "landsat-8" for i in items["l8"].values())
    # Provenance: every search is recorded in the file.
    prov = manifest.provenance
    assert prov["searches"] and all(s["body"]["datetime"] or s["collection"] == "esa-worldcover" for s in prov["searches"])


def test_manifest_figure(clean_manifest, tmp_path: Path) -> None:
    from PIL import Image

    out = figures.plot_manifest(clean_manifest[0], tmp_path / "catalog.png")
    with Image.open(out) as image:
        assert image.size[0] > 1000 and len(set(image.convert("RGB").getdata())) > 50


def test_the_clearest_scene_over_the_footprint_wins(clean_manifest) -> None:
    _, rows = clean_manifest
    for row in rows:
        if row.status != "ok" or row.sensor != "s2":
            continue
        # The anchor is ranked by its cloud/no-data fraction over the footprint first.
        assert all(row.invalid_fraction <= f.invalid_fraction for f in row.fallbacks)
        assert len(row.fallbacks) <= 2


def test_manifest_is_identical_under_injected_faults(clean_manifest, demo_root: Path, served, tmp_path: Path) -> None:
    path, _ = clean_manifest
    # While the pages link to the next one, searches keep the server's own order (no sortby:
    # the Planetary Computer's fast path).
    control.set_faults(served, {})
    control.reset_stats(served)
    _, searches = build_manifest(small_world_config(demo_root, served), tmp_path / "natural.parquet")
    requests = control.get_stats(served)["requests"]
    assert requests["stac_search"] >= len(searches) and requests["stac_search_sorted"] == 0
    assert not any(s["continuations"] for s in searches)
    # Small pages so that paging (and its failures) happens on every search.
    config = small_world_config(demo_root, served, catalogs={"planetary_computer": {"page_limit": 1}},
                                http={"backoff_s": 0.01, "max_retries": 8})
    control.set_faults(served, {"status_429_every": 4, "retry_after_s": 0, "status_503_every": 7, "drop_every": 11,
                                "duplicate_items": True, "routes": ["stac"]})
    faulty = tmp_path / "faulty.parquet"
    build_manifest(config, faulty)
    stats = control.get_stats(served)
    for kind in ("status_429", "status_503", "drop", "duplicate_items"):
        assert stats["faults"][kind] > 0, (kind, stats["faults"])
    assert_same_manifest(path, faulty)

    # Missing `next` links: the client pages by sorted id (the gateway conforms to sort and
    # filter, as the Planetary Computer does)...
    control.set_faults(served, {"omit_next": True})
    config = small_world_config(demo_root, served, catalogs={"planetary_computer": {"page_limit": 1}})
    by_id = tmp_path / "by_id.parquet"
    _, searches = build_manifest(config, by_id)
    assert control.get_stats(served)["faults"]["omit_next"] > 0
    assert any(c.startswith("after id") for s in searches for c in s["continuations"])
    assert any(c == "again, sorted by id" for s in searches for c in s["continuations"])
    assert control.get_stats(served)["requests"]["stac_search_sorted"] > 0
    assert_same_manifest(path, by_id)
    # ...and, on an API without sort and filter, by splitting the date window.
    # Pages of 4: a datatake seen in two tiles (bordeaux: 30TXQ and 31TBK), at two baselines, is
    # 4 items of one sensing second, which no split of the window can separate: a page must hold
    # them all (as on the real service, every item of one second in the searched box).
    control.set_faults(served, {"omit_next": True, "no_sort_filter": True})
    config = small_world_config(demo_root, served, catalogs={"planetary_computer": {"page_limit": 4}})
    split = tmp_path / "split.parquet"
    _, searches = build_manifest(config, split)
    assert any(c.startswith("split at") for s in searches for c in s["continuations"])
    assert_same_manifest(path, split)


def assert_same_manifest(expected: Path, actual: Path) -> None:
    """The same rows and the same items (the provenance may differ: it records the retries)."""
    import pyarrow.parquet as pq

    a, b = pq.read_table(expected), pq.read_table(actual)
    assert a.drop_columns(["geometry"]).equals(b.drop_columns(["geometry"])), _debug_diff(expected, actual)
    assert a.column("geometry").equals(b.column("geometry"))
    assert Manifest(expected).layout["items"] == Manifest(actual).layout["items"]  # same files, by SHA-256
    for path in items_dir(expected).iterdir():
        assert path.read_bytes() == (items_dir(actual) / path.name).read_bytes(), path.name


def test_file_faults_on_mask_reads_are_retried(clean_manifest, demo_root: Path, served, tmp_path: Path) -> None:
    path, _ = clean_manifest
    config = small_world_config(demo_root, served)
    control.set_faults(served, {"status_503_every": 5, "drop_every": 7, "truncate_every": 3, "routes": ["files"]})
    # In a fresh process, as a workflow job: GDAL's in-process cache would otherwise answer.
    sites_path = write_sites(sample_sites(config), tmp_path / "sites.parquet", "EPSG:2154")
    candidates = tmp_path / "shard-0.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "catalog", "search", "--config-json", json.dumps(config), "--sites",
         str(sites_path), "--shard", "0", "--out", str(candidates)], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    faults = control.get_stats(served)["faults"]
    assert faults["status_503"] > 0 and faults["drop"] > 0 and faults["truncate"] > 0, faults
    out = tmp_path / "files.parquet"
    catalog.merge_manifest(config, sample_sites(config), [candidates], out)
    assert_same_manifest(path, out)


def test_searches_grow_with_groups_not_sites(demo_root: Path, served, tmp_path: Path) -> None:
    counts = {}
    for per_city in (1, 4):
        config = small_world_config(demo_root, served, sites={"sites_per_city": per_city})
        control.reset_stats(served)
        sites = sample_sites(config)
        searches = catalog.search_shard(config, sites, 0, tmp_path / f"shard-{per_city}.parquet").searches
        counts[per_city] = (len(searches), control.get_stats(served)["requests"]["stac_search"])
    windows = len(catalog.season_windows(config["dates"]))
    groups = 2  # one search cell per city
    assert counts[1] == counts[4]
    assert counts[4][0] == groups * (2 * windows + 1)


# ------------------------------------------------------------------------------ frozen mode


def test_frozen_mode_makes_no_request_and_copies_the_manifest(clean_manifest, served, tmp_path: Path) -> None:
    path, _ = clean_manifest
    out = tmp_path / "frozen" / "manifest.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "catalog", "freeze", "--config-json",
         json.dumps({"catalog": {"manifest": str(path)}}), "--out", str(out), "--summary", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == path.read_bytes()
    assert json.loads((tmp_path / "s.json").read_text())["sites"] == 8
    stats = control.get_stats(served)["requests"]
    assert stats["stac_search"] == 0 and stats["files"] == 0 and stats["wms_getmap"] == 0


def test_frozen_mode_refuses_what_is_not_a_manifest(tmp_path: Path) -> None:
    bogus = tmp_path / "sites.parquet"
    config = load_config(REPO / "config.yaml", {"world": "demo"})
    write_sites(sample_sites(config), bogus, "EPSG:2154")
    for given, message in ((tmp_path / "missing.parquet", "does not exist"), (bogus, "not an xstars manifest")):
        with pytest.raises(Exception, match=message):
            Manifest(given)


# ------------------------------------------------------------------------------ bad input


def test_unknown_collection_names_the_config_key(demo_root: Path, served) -> None:
    config = small_world_config(demo_root, served, sensors={"s2": {**load_config()["sensors"]["s2"], "collection": "sentinel-2-l3"}})
    with pytest.raises(ConfigError, match=r"sensors\.s2\.collection: collection 'sentinel-2-l3' does not exist at http://127"):
        catalog.search_shard(config, sample_sites(config), 0, Path("unused.parquet"))


def test_empty_date_window_names_dates() -> None:
    dates = {"start": "2022-11-01", "end": "2022-12-31", "seasons": [{"name": "summer", "months": [6, 7, 8]}]}
    with pytest.raises(ConfigError, match=r"dates: no day of any season \(summer\) falls between start 2022-11-01 and end 2022-12-31: the date window is empty"):
        catalog.season_windows(dates)


def test_unreachable_endpoint_names_the_url(demo_root: Path, demo_server: control.ServerInfo) -> None:
    port = free_port()
    config = small_world_config(demo_root, demo_server,
                                catalogs={"planetary_computer": {"url": f"http://127.0.0.1:{port}/stac"}},
                                http={"max_retries": 1, "backoff_s": 0.01})
    with pytest.raises(ServiceError, match=rf"catalogs\.planetary_computer\.url http://127\.0\.0\.1:{port}/stac "
                                           "is unreachable"):
        catalog.search_shard(config, sample_sites(config), 0, Path("unused.parquet"))


def test_cli_prints_one_clear_error_line(demo_root: Path, served, tmp_path: Path) -> None:
    config = small_world_config(demo_root, served, sensors={"labels": {"collection": "esa-worldcover-v9"}})
    sites = tmp_path / "sites.parquet"
    write_sites(sample_sites(config), sites, "EPSG:2154")
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "catalog", "search", "--config-json", json.dumps(config), "--sites",
         str(sites), "--shard", "0", "--out", str(tmp_path / "c.parquet")], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: sensors.labels.collection: collection 'esa-worldcover-v9' does not exist at {config['catalogs']['planetary_computer']['url']}")
    assert not (tmp_path / "c.parquet").exists() and not (tmp_path / "c.items").exists()


# ------------------------------------------------------- real Planetary Computer items, served


@pytest.fixture(scope="module")
def pc_server(tmp_path_factory):
    """The recorded Planetary Computer items served by the demo STAC server, plus variants:
    a projection-2.0 copy (``proj:code``) and a reprocessed duplicate at baseline 05.00."""
    root = tmp_path_factory.mktemp("pc_world")
    features = []
    for name in ("sentinel-2-l2a", "landsat-c2-l2"):
        features += json.loads((FIXTURES / f"{name}.items.json").read_text())["features"]
    original = next(f for f in features if f["id"] == "S2A_MSIL2A_20190101T000001_R116_T59UMU_20201007T214652")
    reprocessed = copy.deepcopy(original)
    reprocessed["id"] = original["id"].replace("20201007T214652", "20230301T101010")
    reprocessed["properties"]["s2:processing_baseline"] = "05.00"
    reprocessed["properties"]["s2:generation_time"] = "2023-03-01T10:10:10.000000Z"
    reprocessed["properties"]["proj:code"] = f"EPSG:{reprocessed['properties'].pop('proj:epsg')}"
    features.append(reprocessed)
    # A Landsat scene served without its quality mask (seen on real catalogues mid-ingestion).
    landsat = next(f for f in features if f["id"] == "LC08_L2SP_033032_20231008_02_T1")
    no_mask = copy.deepcopy(landsat)
    no_mask["id"] = landsat["id"].replace("20231008", "20190615")
    no_mask["properties"]["datetime"] = "2019-06-15T17:30:00Z"
    del no_mask["assets"]["qa_pixel"]
    features.append(no_mask)
    (root / "stac").mkdir()
    (root / "stac" / "items.ndjson").write_text("".join(json.dumps(f) + "\n" for f in features))
    info = control.start(root, port=free_port(), backend_port=free_port())
    yield info, original, reprocessed, no_mask
    control.stop(root)


def pc_searcher(info: control.ServerInfo) -> StacSearcher:
    config = load_config()
    pc = config["catalogs"]["planetary_computer"] | {"url": info.stac_url, "page_limit": 5}
    return StacSearcher(pc, config["http"] | {"backoff_s": 0.01})


def test_real_sentinel2_items_reprocessing_and_projection(pc_server) -> None:
    info, original, reprocessed, _ = pc_server
    searcher = pc_searcher(info)
    window = catalog.SearchWindow("2019-01", catalog.stac_items.parse_time("2018-12-31T00:00:00Z"),
                                  catalog.stac_items.parse_time("2019-01-02T00:00:00Z"))
    found = searcher.search("sentinel-2-l2a", [170.6, 53.16, 170.9, 53.24], window, group_id="g",
                            platforms=["sentinel-2a"])  # the items spell it "Sentinel-2A"
    assert {i["id"] for i in found} >= {original["id"], reprocessed["id"]}
    kept = stac_items.dedupe_s2_reprocessed(found)
    assert reprocessed["id"] in {i["id"] for i in kept} and original["id"] not in {i["id"] for i in kept}
    # Both projection spellings give the same CRS; the offset follows the baseline, not the date.
    assert stac_items.item_crs(original) == stac_items.item_crs(reprocessed) == "EPSG:32659"
    assert "proj:epsg" in original["properties"] and "proj:code" in reprocessed["properties"]
    assert stac_items.s2_offset_for_baseline(stac_items.processing_baseline(original)) == 0
    assert stac_items.s2_offset_for_baseline(stac_items.processing_baseline(reprocessed)) == -1000


def test_real_items_every_spelling(pc_server) -> None:
    info, _, _, _ = pc_server
    searcher = pc_searcher(info)
    everything = catalog.SearchWindow("all", catalog.stac_items.parse_time("2018-01-01T00:00:00Z"),
                                      catalog.stac_items.parse_time("2026-01-01T00:00:00Z"))
    s2 = searcher.search("sentinel-2-l2a", [-180, -90, 180, 90], everything, group_id="world")
    platforms = {i["properties"]["platform"] for i in s2}
    assert {"Sentinel-2A", "sentinel-2b"} <= platforms
    baselines = {stac_items.processing_baseline(i) for i in s2}
    assert {"02.12", "05.09", "05.11"} <= baselines
    for item in s2:  # every item tells its CRS and offset
        assert stac_items.item_epsg(item) in range(32601, 32761)
        expected = 0 if stac_items.processing_baseline(item) < "04.00" else -1000
        assert stac_items.s2_offset_for_baseline(stac_items.processing_baseline(item)) == expected
    # Paged with limit 5 and more items than that: all were collected.
    total = len(json.loads((FIXTURES / "sentinel-2-l2a.items.json").read_text())["features"]) + 1
    assert len(s2) == total
    landsat = searcher.search("landsat-c2-l2", [-180, -90, 180, 90], everything, group_id="world",
                              platforms=["landsat-8"])
    assert landsat and {i["properties"]["platform"] for i in landsat} == {"landsat-8"}
    # Server-side filtering is not advertised by this server, so the cloud filter ran client-side.
    assert not searcher.conforms_query
    clear = searcher.search("sentinel-2-l2a", [-180, -90, 180, 90], everything, group_id="world", max_cloud_cover=30)
    assert clear and all(i["properties"]["eo:cloud_cover"] <= 30 for i in clear)


def test_an_item_without_a_configured_asset_is_skipped_not_fatal(pc_server) -> None:
    from shapely.geometry import shape

    info, _, _, no_mask = pc_server
    crs = catalog.stac_items.item_crs(no_mask)
    config = load_config(REPO / "config.yaml", {
        "catalogs": {"planetary_computer": {"url": info.stac_url}}, "http": {"backoff_s": 0.01},
        "sites": {"crs": crs, "footprint_m": 2240},
        "dates": {"start": "2019-06-01", "end": "2019-06-30", "seasons": [{"name": "june", "months": [6]}]}})
    centre = catalog.reproject_geometry(shape(no_mask["geometry"]).centroid, "EPSG:4326", crs)
    site = Site("s", "test", int(centre.x // 2240), int(centre.y // 2240), 2240.0, "train")
    services = catalog.Services(config)
    l8 = sensors_of(config)["l8"]
    rows = catalog.raster_candidates(l8, catalog.SearchGroup("g", (site,)), services)
    assert rows == []
    [entry] = services.search_log()
    assert entry["kept"] == 1 and entry["skipped"] == [f"{no_mask['id']}: no asset qa_pixel (sensors.l8)"]
    counted = summary([], [entry])
    assert counted["items_skipped"] == 1


def test_unsigned_strips_sas_tokens() -> None:
    item = {"id": "x", "assets": {"B04": {"href": "https://a.blob.core.windows.net/c/B04.tif?st=1&se=2&sig=abc"}},
            "links": [{"rel": "self"}]}
    clean = stac_items.unsigned(item)
    assert clean["assets"]["B04"]["href"] == "https://a.blob.core.windows.net/c/B04.tif"
    assert "links" not in clean and "sig=" in item["assets"]["B04"]["href"]  # the original is untouched


def test_site_grouping_is_stable() -> None:
    sites = [Site(f"c_{c}_{r}", "c", c, r, 240.0, "train") for c in range(30) for r in range(3)]
    groups = catalog.search_groups(sites, 2400)
    assert [len(g.sites) for g in groups] == [30, 30, 30]
    assert catalog.search_groups(list(reversed(sites)), 2400) == groups
    assert sum(len(catalog.shard_of(groups, i, 2)) for i in range(2)) == 3


def test_search_shards_are_compact_patches_of_about_equal_size() -> None:
    """Each search shard gets a compact patch of the map (so it searches few tiles and stores
    few items), every group exactly once, and about as many sites as the others."""
    sites = [Site(f"c_{c}_{r}", "c", c, r, 2400.0, "train") for c in range(64) for r in range(48)
             if (c - 32) ** 2 + (r - 24) ** 2 < 24 ** 2]  # a round country of 1,800 sites, one per cell
    groups = catalog.search_groups(sites, 2400)
    shards = [catalog.shard_of(groups, k, 16) for k in range(16)]
    assert sorted(g.group_id for shard in shards for g in shard) == sorted(g.group_id for g in groups)
    sizes = [sum(len(g.sites) for g in shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1, sizes
    # "Tiles" of 8 x 8 cells (a Sentinel-2 tile is some 46 search cells of 2.4 km across): a
    # patch of 1/16 of the country touches a few; dealt round robin, each shard touched them all.
    tiles = [{(g.cell[0] // 8, g.cell[1] // 8) for g in shard} for shard in shards]
    all_tiles = {t for shard in tiles for t in shard}
    assert max(len(t) for t in tiles) <= 6 < len(all_tiles) / 4, [len(t) for t in tiles]


def _debug_diff(expected: Path, actual: Path) -> str:
    import geopandas as gpd

    a, b = gpd.read_parquet(expected), gpd.read_parquet(actual)
    out = []
    for column in a.columns:
        if column == "geometry":
            continue
        differs = a[column].astype(str) != b[column].astype(str)
        for i in differs[differs].index[:3]:
            out.append(f"{column} row {i} {a.site_id[i]} {a.sensor[i]}: {str(a[column][i])[:80]} != {str(b[column][i])[:80]}")
    return "\n".join(out)
