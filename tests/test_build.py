"""build_dataset: from the manifest to the Zarr store, on the demo world's real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.conftest import free_port
from tests.test_catalog import build_manifest, small_world_config
from xstars import store
from xstars.demo import control, layout
from xstars.errors import DataError
from xstars.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory) -> dict:
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, build={"samples_per_shard": 3, "margin_m": 240})
    return build_store(config, tmp_path_factory.mktemp("build"))


def build_store(config: dict, folder: Path) -> dict:
    """Catalog then store, in `folder`, through the library (no workflow): what tests build on."""
    build_manifest(config, folder / "manifest.parquet")
    manifest = Manifest(folder / "manifest.parquet")
    path = folder / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    per_shard = config["build"]["samples_per_shard"]
    parts = [store.build_part(path, manifest, config, k) for k in range(store.n_parts(n, per_shard))]
    summary = store.finalize(path, manifest, parts, config)
    # "manifest": the rows as a frame, for the tests to query; "opened": the file, as jobs read it.
    return {"config": config, "manifest": manifest.frame(), "opened": manifest, "folder": folder, "path": path,
            "parts": parts, "summary": summary, "n": n}


def config_sensors(built: dict) -> list[str]:
    from xstars.sensors import sensors_of

    return list(sensors_of(built["config"]))


def rewritten_manifest(built: dict, out: Path, rows_of=lambda rows: rows, items_of=lambda items: items) -> Manifest:
    """A copy of the built manifest at ``out``, its rows and items (by sensor) changed by the
    given functions, written by the library's own writer."""
    import rustac

    from xstars.catalog import manifest_rows
    from xstars.manifest import write_manifest

    manifest = built["opened"]
    items = {sensor: rustac.read_sync(str(manifest.items_path(sensor)), set_self_link=False)["features"]
             for sensor in manifest.layout["items"]}
    write_manifest(rows_of(manifest_rows(manifest)), items_of(items), out, manifest.crs, manifest.provenance,
                   manifest.sites_per_row_group)
    return Manifest(out)


def own_items(built: dict, out: Path, site: str, sensor: str, edit, chosen_only: bool = False) -> Manifest:
    """The built manifest with ``site``'s ``sensor`` items (the chosen one, and the fallbacks
    unless ``chosen_only``) replaced by copies of their own (``<id>~own``) changed by ``edit``:
    items are shared by the sites of a scene, so a site's own change needs its own items."""
    import copy
    import dataclasses

    [row] = [r for rows in [built["opened"].part(0, 10**6)] for site_rows in rows for r in site_rows
             if r.site_id == site and r.sensor == sensor]
    edited = [row.item_id] if chosen_only else list(row.item_ids)

    def rows_of(rows):
        own = dataclasses.replace(row, item_id=row.item_id + "~own", fallbacks=tuple(
            dataclasses.replace(f, item_id=f.item_id + "~own") if f.item_id in edited else f for f in row.fallbacks))
        return [own if r == row else r for r in rows]

    def items_of(items):
        copies = []
        for item in items[sensor]:
            if item["id"] in edited:
                mine = copy.deepcopy(item)
                mine["id"] += "~own"
                edit(mine)
                copies.append(mine)
        return items | {sensor: items[sensor] + copies}

    return rewritten_manifest(built, out, rows_of, items_of)


def test_store_layout_is_readable_with_xarray_and_rioxarray(built) -> None:
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    n = built["n"]
    assert n == built["manifest"].loc[built["manifest"].status == "ok"].site_id.nunique()
    sizes = {"s2": (10, 24), "l8": (7, 8), "ign": (4, 240), "labels": (1, 24)}
    for sensor, (bands, size) in sizes.items():
        ds = xr.open_zarr(built["path"], group=sensor, decode_coords="all")
        assert ds.data.shape == (n, bands, size, size), sensor
        assert list(ds.site_id.values) == store.stored_sites(built["opened"])  # same sample order everywhere
        assert set(ds.split.values) <= {"train", "val", "test"}
        assert ds.data.attrs.get("grid_mapping") == "spatial_ref" or ds.data.encoding.get("grid_mapping") == "spatial_ref"
        one = ds.data.isel(sample=0)
        assert one.rio.crs.to_epsg() == 2154  # through the CF grid mapping
        located = store.georeferenced(ds, 0)  # and each sample's own transform
        assert located.rio.transform().to_gdal() == tuple(ds.transform.values[0])
        assert located.rio.crs.to_epsg() == 2154
        ok = ds.status.values == "ok"
        assert ok.any() and (ds.valid.values[ok].mean() > 0.8)
    s2 = xr.open_zarr(built["path"], group="s2")
    reflectance = s2.data.values[s2.valid.values[:, None].repeat(10, 1).astype(bool)]
    assert 0.0 < np.median(reflectance) < 0.5  # decoded to physical units (CF scale_factor)
    stats = json.loads(json.dumps(s2.attrs["normalization"]))
    assert stats["split"] == "train" and len(stats["mean"]) == 10 and stats["pixels"] > 0


def test_coregistration_meets_the_targets_on_known_shifts(built, demo_root: Path) -> None:
    """Residual after correction, in pixels of the coarser sensor of each pair, against the truth."""
    from xstars.demo.check import coregistration_residuals

    figures = coregistration_residuals(demo_root, built["parts"])
    print(json.dumps(figures, indent=1))
    from xstars.sensors import image_sensors

    reference = built["config"]["build"]["coregister_reference"]
    assert set(figures) == {f"{name}->{reference}" for name in image_sensors(built["config"]) if name != reference}
    assert set(figures) == {"s2->ign", "l8->ign", "spot->ign"}
    for pair, f in figures.items():
        # The tests' world is small (1.28 km cities, 8-pixel Landsat tiles): a few estimates are
        # not trusted and are flagged; the demo world's figures are in BENCHMARKS.md.
        assert f["flagged"] <= f["estimates_applied"] // 4, (pair, f)
        assert f["after_median_px"] <= 0.25, (pair, f)
        assert f["after_p95_px"] <= 0.6, (pair, f)
        assert f["after_median_px"] < f["before_median_px"] / 2, (pair, f)
    # Flagged estimates are recorded with their reason and left uncorrected.
    for part in built["parts"]:
        for record in part["records"]:
            for shift in record["shifts"].values():
                assert shift["applied"] == (shift["flag"] == "")


def test_two_builds_are_identical_and_a_killed_part_recovers(built, tmp_path: Path) -> None:
    import zarr

    config, manifest = built["config"], built["opened"]
    path = tmp_path / "again.zarr"
    store.init_store(path, manifest, config)
    manifest_path = built["folder"] / "manifest.parquet"
    n_parts = store.n_parts(built["n"], 3)

    def run_part(part: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "xstars", "build", "part", "--config-json", json.dumps(config), "--manifest",
             str(manifest_path), "--store", str(path), "--part", str(part), "--out", str(tmp_path / f"p{part}.json")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # Part 0 is killed with SIGKILL while it works, and one of its shard files is left truncated,
    # as a kill in the middle of the write would leave it; then the part is simply run again.
    victim = run_part(0)
    time.sleep(2.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    for k in range(n_parts):
        job = run_part(k)
        assert job.wait(timeout=600) == 0, job.stderr.read()[-2000:]
    shard = path / "s2" / "data" / "c" / "0" / "0" / "0" / "0"  # part 0: samples 0-2, all bands
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    job = run_part(0)
    assert job.wait(timeout=600) == 0, job.stderr.read()[-2000:]
    first, second = zarr.open_group(str(built["path"]), mode="r"), zarr.open_group(str(path), mode="r")
    for sensor in config_sensors(built):
        for name in ("data", "valid", "transform", "shift_x_m", "cloud_fraction", "item_id"):
            a, b = first[sensor][name][:], second[sensor][name][:]
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (sensor, name)


def test_normalisation_statistics_from_the_parts_equal_those_of_the_stored_training_split(built) -> None:
    # Each build job records its sums; finalize adds them up instead of reading the store back.
    import zarr

    root = zarr.open_group(str(built["path"]), mode="r")
    assert all("statistics" in part for part in built["parts"])
    for sensor in ("s2", "l8", "ign"):
        group = root[sensor]
        train = np.nonzero((group["split"][:] == "train") & (group["status"][:] == "ok"))[0]
        read_back = store._band_statistics(group, train)
        assert read_back["pixels"] > 0
        assert group.attrs["normalization"] == built["summary"]["normalization"][sensor] == read_back
    # Part records without sums (an older build) are still finalised, by reading the store.
    legacy = [{k: v for k, v in part.items() if k != "statistics"} for part in built["parts"]]
    summary = store.finalize(built["path"], built["opened"], legacy, built["config"])
    assert summary["normalization"] == built["summary"]["normalization"]


def test_completeness_check_names_a_missing_part(built) -> None:
    from xstars.errors import DataError

    with pytest.raises(DataError, match=r"samples \[.*\] were written by no part"):
        store.finalize(built["path"], built["opened"], built["parts"][1:], built["config"])


def test_an_unreadable_scene_falls_back_to_the_next_one(built, tmp_path: Path) -> None:
    config = built["config"]
    site = store.stored_sites(built["opened"])[0]
    [row] = [r for r in built["opened"].part(0, 3)[0] if r.sensor == "s2"]
    assert row.fallbacks, "the small world keeps fallbacks for every S2 choice"

    def break_b04(item: dict) -> None:
        item["assets"]["B04"]["href"] = item["assets"]["B04"]["href"].replace("B04.tif", "B04-missing.tif")

    manifest = own_items(built, tmp_path / "manifest.parquet", site, "s2", break_b04, chosen_only=True)
    path = tmp_path / "fallback.zarr"
    store.init_store(path, manifest, config)
    record = store.build_part(path, manifest, config, 0)["records"][0]
    assert record["site_id"] == site and record["status"] == "ok"
    assert record["fallbacks_tried"]["s2"] == 1
    assert record["items"]["s2"] == row.fallbacks[0].item_id


def test_a_403_is_answered_by_signing_again(built, demo_server: control.ServerInfo, monkeypatch) -> None:
    """An expired token (HTTP 403 AuthenticationFailed) makes the read sign the href afresh."""
    from xstars import acquire, remote

    signed = []
    real_sign = remote.sign_href
    monkeypatch.setattr(remote, "sign_href", lambda href, signing, fresh=False, **kw: signed.append(fresh) or
                        real_sign(href, signing, fresh=fresh, **kw))
    config = built["config"]
    row = built["manifest"][(built["manifest"].status == "ok") & (built["manifest"].sensor == "l8")].iloc[0]
    item = built["opened"].items("l8").get([row.item_id])[row.item_id]
    control.set_faults(demo_server, {"status_403_every": 1, "routes": ["files"]})
    try:
        grid = acquire.site_grid(row.geometry.bounds, 30, "EPSG:2154")
        href = item["assets"]["red"]["href"].replace("red.tif", "red.tif?st=x&se=y&sig=SECRET")
        pc = config["catalogs"]["planetary_computer"]
        with pytest.raises(remote.ServiceError) as failure:
            remote.read_source(href, grid, catalog_cfg=pc, http_cfg=config["http"] | {"max_retries": 2}, what="x/red")
        assert "SECRET" not in str(failure.value) and "403" in str(failure.value)
        assert signed == [False, True, True]  # every retry after a 403 asked for a fresh token
        control.set_faults(demo_server, {"status_403_every": 2, "routes": ["files"]})
        signed.clear()
        source = remote.read_source(item["assets"]["red"]["href"], grid, catalog_cfg=pc, http_cfg=config["http"],
                                    what="x/red")
        assert source.data.size > 0 and control.get_stats(demo_server)["faults"]["status_403"] > 0
    finally:
        control.set_faults(demo_server, {})


BLOB = "http://xstarstest.blob.core.windows.net/files"


def first_kept_site(built: dict) -> str:
    frame = built["manifest"]
    return next(s for s in store.stored_sites(built["opened"])[:3] if (frame[frame.site_id == s].status == "ok").all())


def on_unknown_storage(built: dict, out: Path, sensor: str = "s2") -> tuple[Manifest, str]:
    """The manifest with the first kept site's `sensor` scenes (chosen and fallbacks) moved to a
    storage account the demo's token endpoint has no token for (it answers 404): the SDK signs
    them, asking its token endpoint, and gets none."""
    site = first_kept_site(built)

    def to_blob(item: dict) -> None:
        for asset in item["assets"].values():
            parts = urlsplit(asset["href"])
            assert parts.netloc.endswith(".blob.core.windows.net")
            asset["href"] = f"{BLOB}/{layout.local_path(Path('.'), asset['href']).relative_to('files')}"

    return own_items(built, out, site, sensor, to_blob), site


def test_a_site_whose_signing_keeps_failing_is_dropped_and_the_part_kept(built, demo_server, tmp_path) -> None:
    config = built["config"] | {"http": built["config"]["http"] | {"max_retries": 1, "backoff_s": 0.01}}
    manifest, site = on_unknown_storage(built, tmp_path / "manifest.parquet")
    path = tmp_path / "dataset.zarr"
    store.init_store(path, manifest, config)
    control.reset_stats(demo_server)
    record = store.build_part(path, manifest, config, 0)  # the part is built, not killed
    by_site = {r["site_id"]: r for r in record["records"]}
    assert control.get_stats(demo_server)["requests"]["tokens"] > 0
    assert by_site[site]["status"] == "dropped" and by_site[site]["reason"].startswith("s2: no usable scene")
    [chosen] = [r for rows in manifest.part(0, 3) for r in rows if r.site_id == site and r.sensor == "s2"]
    assert chosen.item_id.endswith("~own") and f"signing sentinel-2-l2a/{chosen.item_id}/" in by_site[site]["reason"]
    assert "HTTP 404" in by_site[site]["reason"]
    others = [r for r in record["records"] if r["site_id"] != site]
    assert others and all(r["status"] == built["parts"][0]["records"][i]["status"]
                          for i, r in enumerate(record["records"]) if r["site_id"] != site)


def test_no_token_in_a_build_job_log_at_debug(built, demo_root: Path, tmp_path: Path) -> None:
    """`xstars build part` at DEBUG (GDAL's debug messages on) as a Snakemake job runs it: one
    site's Sentinel-2 scenes on blob storage, signed with a token holding SECRET, their files
    answering the header and failing every later range (GDAL names them with their query).
    The job's token endpoint and proxy are loopback servers of this test's (the gateway's
    tokens are never SECRET, its files never fail this way)."""
    from tests.loopback import Answer, range_answer, serve, token_answer

    manifest, site = on_unknown_storage(built, tmp_path / "manifest.parquet")
    manifest_path = manifest.path
    path = tmp_path / "dataset.zarr"
    store.init_store(path, manifest, built["config"])

    def files(request) -> Answer:
        """Every GDAL read goes through this proxy. The demo's files are small (one 32 KiB range
        holds a whole one): a signed href gets its first 8 KiB (the header) and no more, any
        later range fails."""
        host = request.headers["host"]
        local = demo_root / request.path.lstrip("/") if host == urlsplit(BLOB).netloc else \
            layout.local_path(demo_root, f"http://{host}{request.path}")
        answer = range_answer(local.read_bytes(), request)
        if "sig=" not in request.query or answer.status != 206:
            return answer
        if not request.headers["range"].startswith("bytes=0-"):
            return Answer(500, b"busy")
        size = answer.headers["Content-Range"].rsplit("/", 1)[1]
        return Answer(206, answer.body[:8192], {"Content-Range": f"bytes 0-8191/{size}"})

    with serve(lambda request: token_answer()) as tokens, serve(files) as proxy:
        pc = built["config"]["catalogs"]["planetary_computer"] | {"token_url": f"{tokens.url}/api/sas/v1/token"}
        config = built["config"] | {"http": {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 10, "proxy": proxy.proxy},
                                    "catalogs": built["config"]["catalogs"] | {"planetary_computer": pc}}
        env = os.environ | {"CPL_DEBUG": "ON"}
        result = subprocess.run(
            [sys.executable, "-m", "xstars", "--log-level", "DEBUG", "build", "part", "--config-json",
             json.dumps(config), "--manifest", str(manifest_path), "--store", str(path), "--part", "0", "--out",
             str(tmp_path / "part-0.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("sig=SECRET" in r.query for r in proxy.requests), "the signed hrefs were read"
    log = result.stderr + result.stdout
    assert "IReadBlock failed" in log and "rasterio._base" in log  # the messages that named the signed file
    assert "SECRET" not in log
    record = json.loads((tmp_path / "part-0.json").read_text())
    assert next(r for r in record["records"] if r["site_id"] == site)["status"] == "dropped"
    for written in [tmp_path / "part-0.json", *path.rglob("*")]:
        assert not written.is_file() or b"SECRET" not in written.read_bytes(), written


def test_verify_checks_sites_and_recorded_shard_checksums(built: dict, tmp_path: Path) -> None:
    import shutil

    from xstars.verify import verify_store

    report = verify_store(built["path"], built["opened"])
    assert report["ok"], report["problems"]
    assert report["shards_checked"] == sum(len(part["checksums"]) for part in built["parts"]) > 0
    # A flipped byte in one shard, and a manifest site the store does not hold: both named.
    copy = tmp_path / "dataset.zarr"
    shutil.copytree(built["path"], copy)
    shard = copy / "ign" / "data" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    import dataclasses

    def with_extra_site(rows):
        first = [r for r in rows if r.site_id == rows[0].site_id]
        return rows + [dataclasses.replace(r, site_id="zz-not-built") for r in first]

    report = verify_store(copy, rewritten_manifest(built, tmp_path / "manifest.parquet", with_extra_site))
    assert not report["ok"]
    assert any("ign/data/c/0/0/0/0: checksum differs" in p for p in report["problems"])
    assert any("missing ['zz-not-built']" in p for p in report["problems"])


def test_a_site_dropped_by_the_catalog_is_stored_with_its_reason(built: dict, tmp_path: Path) -> None:
    # The samples are the manifest's sites, dropped ones included: their count, hence the
    # build jobs, is known before the catalog runs (workflow/rules/common.smk plans them).
    import dataclasses

    import zarr

    from xstars.verify import verify_store

    config = built["config"]
    site = store.stored_sites(built["opened"])[1]
    manifest = rewritten_manifest(built, tmp_path / "manifest.parquet", lambda rows: [
        dataclasses.replace(r, status="dropped", reason="s2: no scene clear enough", reason_code="too_invalid",
                            reason_sensor="s2") if r.site_id == site else r for r in rows])
    path = tmp_path / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    assert n == built["n"] == len(manifest.site_ids())
    parts = [store.build_part(path, manifest, config, k) for k in range(store.n_parts(n, 3))]
    assert parts[0]["records"][1] | {"items": None} == parts[0]["records"][1] | {
        "site_id": site, "status": "dropped", "dropped_by": "catalog", "reason": "s2: no scene clear enough",
        "reason_code": "too_invalid", "reason_sensor": "s2", "items": None}
    summary = store.finalize(path, manifest, parts, config)
    assert summary["dropped_by_reason"].get("s2: catalog") == 1
    assert summary["kept"] == built["summary"]["kept"] - 1
    root = zarr.open_group(str(path), mode="r")
    for sensor in config_sensors(built):
        assert root[sensor]["status"][1] == "dropped: s2: no scene clear enough"
        assert root[sensor]["valid"][1].max() == 0 and root[sensor]["item_id"][1] == ""
    assert verify_store(path, manifest)["ok"]
    # A store that kept it anyway is named by verify.
    assert not verify_store(built["path"], manifest)["ok"]


# ------------------------------------------------------- one collection from another catalogue


#: Earth Search's asset keys for the Sentinel-2 bands (tests/test_earth_search.py checks them
#: against the recorded real items).
EARTH_SEARCH_KEYS = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
                     "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09",
                     "B11": "swir16", "B12": "swir22", "SCL": "scl", "visual": "visual"}


def as_earth_search(item: dict, sequence: int) -> dict:
    """A demo Sentinel-2 item as Earth Search would serve it: its asset keys, its id scheme
    (``S2A_31TCJ_20210712_0_L2A``, the sequence telling reprocessed copies apart), the tile as
    ``mgrs:*`` and ``grid:code`` (no ``s2:mgrs_tile``), a lower-case platform, the offset
    declared in ``raster:bands``, the files public (Earth Search's bucket: no token)."""
    import copy

    from xstars import items as stac_items

    es = copy.deepcopy(item)
    props = es["properties"]
    tile = props.pop("s2:mgrs_tile")
    baseline = stac_items.processing_baseline(item)
    es["id"] = f"{item['id'][:3]}_{tile}_{props['datetime'][:10].replace('-', '')}_{sequence}_L2A"
    props.update({"platform": props["platform"].lower(), "mgrs:utm_zone": int(tile[:2]), "mgrs:latitude_band": tile[2],
                  "mgrs:grid_square": tile[3:], "grid:code": f"MGRS-{tile}", "s2:sequence": str(sequence),
                  "earthsearch:boa_offset_applied": baseline >= "04.00"})
    offset = stac_items.s2_offset_for_baseline(baseline) / 10000
    es["assets"] = {}
    for key, asset in item["assets"].items():
        if key in EARTH_SEARCH_KEYS:
            relative = layout.local_path(Path("."), asset["href"]).relative_to("files").as_posix()
            asset = {**asset, "href": f"{layout.FILES_URL_PLACEHOLDER}/{relative}"}
            if key.startswith("B"):
                asset = {**asset, "raster:bands": [{"nodata": 0, "data_type": "uint16", "scale": 1e-4, "offset": offset}]}
            es["assets"][EARTH_SEARCH_KEYS[key]] = asset
    return es


def acquisition(item_id: str) -> tuple[str, str]:
    """(date, MGRS tile) of a Planetary Computer or Earth Search Sentinel-2 id."""
    parts = item_id.split("_")
    return (parts[2][:8], parts[4][1:]) if parts[1] == "MSIL2A" else (parts[2], parts[1])


@pytest.fixture(scope="module")
def earth_search_world(demo_root: Path, tmp_path_factory):
    """The demo world's Sentinel-2 items, alone and in Earth Search's form, on a second server
    (the same files): the Planetary Computer's collection as Earth Search serves it."""
    root = tmp_path_factory.mktemp("earth_search_world")
    (root / "files").symlink_to(demo_root / "files")
    (root / "stac").mkdir()
    items = [json.loads(line) for line in (demo_root / "stac" / "items.ndjson").read_text().splitlines() if line]
    s2 = sorted((i for i in items if i["collection"] == "sentinel-2-l2a"), key=lambda i: i["id"])
    seen: dict[tuple[str, str], int] = {}
    es = []
    for item in s2:
        key = acquisition(item["id"])
        seen[key] = seen.get(key, -1) + 1
        es.append(as_earth_search(item, seen[key]))
    assert len({i["id"] for i in es}) == len(es)
    (root / "stac" / "items.ndjson").write_text("".join(json.dumps(i) + "\n" for i in es))
    info = control.start(root, port=free_port(), backend_port=free_port())
    yield info
    control.stop(root)


def test_sentinel2_from_earth_search_builds_the_same_store(built: dict, demo_root: Path, demo_server, earth_search_world,
                                                          tmp_path: Path) -> None:
    import zarr

    # The catalogue of one sensor switched in config: nothing else changes.
    config = small_world_config(demo_root, demo_server,
                                build=built["config"]["build"],
                                catalogs={"earth_search": {"url": earth_search_world.stac_url}},
                                sensors={"s2": {"catalog": "earth_search"}})
    es = build_store(config, tmp_path)
    pc_rows, es_rows = (b["manifest"][b["manifest"].sensor == "s2"] for b in (built, es))
    assert len(es_rows) == len(pc_rows) and (es_rows.status == "ok").sum() == (pc_rows.status == "ok").sum()
    # The same scenes, by acquisition (the ids differ by scheme).
    assert [acquisition(i) for i in es_rows.item_id] == [acquisition(i) for i in pc_rows.item_id]
    provenance = Manifest(tmp_path / "manifest.parquet").provenance
    assert provenance["catalogs"]["earth_search"]["url"] == earth_search_world.stac_url
    a, b = (zarr.open_group(str(x["path"]), mode="r") for x in (built, es))
    for sensor in config_sensors(built):
        for name in ("data", "valid", "cloud_fraction", "shift_x_m", "shift_y_m"):
            np.testing.assert_array_equal(a[sensor][name][:], b[sensor][name][:], err_msg=f"{sensor}/{name}")


# ------------------------------------------------------------- labels on a WorldCover tile edge


def test_a_footprint_on_a_label_tile_edge_is_labelled_from_both_tiles(demo_root: Path, demo_server,
                                                                      tmp_path: Path) -> None:
    """etercy lies on the meridian 6 E, the edge of WorldCover tiles N45E003 and N45E006: a footprint
    across it is labelled from the mosaic of both (each alone covers part of it)."""
    from shapely.geometry import box as shapely_box

    from tests.conftest import SMALL_DEMO
    from xstars import catalog
    from xstars.acquire import acquire_tile
    from xstars.manifest import ItemsFile, write_items
    from xstars.sensors import sensors_of
    from xstars.sites import reproject_geometry, sample_sites

    border = next(c for c in SMALL_DEMO["cities"] if c["name"] == "etercy")
    config = small_world_config(demo_root, demo_server, sites={
        "cities": [dict(border)], "sites_per_city": 6,
        "split": {"method": "cities", "val_cities": [], "test_cities": []}})
    lon_bounds = [(s, reproject_geometry(shapely_box(*s.bounds), "EPSG:2154", "EPSG:4326").bounds)
                  for s in sample_sites(config)]
    site = next(s for s, (west, _, east, _) in lon_bounds if west < 6.0 < east)
    labels = sensors_of(config)["labels"]
    services = catalog.Services(config)
    rows = catalog.label_candidates(labels, catalog.SearchGroup("g", (site,)), services)
    by_id = {r.item_id: r for r in rows}
    west_id, east_id = "ESA_WorldCover_10m_2021_v200_N45E003", "ESA_WorldCover_10m_2021_v200_N45E006"
    mosaic_id = f"{west_id}+{east_id}"
    assert sorted(by_id) == sorted([west_id, east_id, mosaic_id])  # the 2020 v100 tiles excluded by the rule
    assert all(0 < by_id[i].invalid_fraction < 1 for i in (west_id, east_id))
    assert by_id[mosaic_id].invalid_fraction == 0 and labels.eligible(0.0, config["catalog"]["max_invalid_fraction"])
    # Through the items file, as a build job reads it (the mosaic names its members, stored
    # beside it), then the build's own read: each tile's classes where it has them.
    items_path = tmp_path / "labels.parquet"
    write_items(services.items["labels"].values(), items_path)
    stored = ItemsFile(items_path).get([mosaic_id, west_id, east_id])
    assert [m["id"] for m in stored[mosaic_id]["xstars:mosaic"]] == [west_id, east_id]
    tile = acquire_tile(labels, stored[mosaic_id], site.bounds, config)
    west = acquire_tile(labels, stored[west_id], site.bounds, config)
    east = acquire_tile(labels, stored[east_id], site.bounds, config)
    assert tile.valid.all() and 0 < west.valid.mean() < 1 and 0 < east.valid.mean() < 1
    assert (west.valid | east.valid).all()
    np.testing.assert_array_equal(tile.data, np.where(west.valid, west.data, east.data))


def test_parts_packed_from_locality_groups_are_the_same_store_byte_for_byte(built, tmp_path: Path) -> None:
    """build.sites_per_group > 0: group jobs read the sites in Z-order and stage them, the parts
    pack; same shards, same part records as the one-step build. A site missing from the staging
    is an error naming it, its group and the command, and leaves the store as it was."""
    from xstars.cli import main
    from xstars.staging import locality_groups, staged_file

    config = built["config"] | {"build": {**built["config"]["build"], "sites_per_group": 3}}
    manifest_path, staging = built["folder"] / "manifest.parquet", tmp_path / "staging"
    path = tmp_path / "packed.zarr"
    store.init_store(path, built["opened"], config)
    groups = locality_groups(built["opened"].site_cells(), 3)
    assert sorted(i for g in groups for i in g) == list(range(built["n"])) and len(groups) == 3
    assert groups != [list(range(k, min(k + 3, built["n"]))) for k in range(0, built["n"], 3)]  # not store order
    cfg = ["--config-json", json.dumps(config), "--manifest", str(manifest_path)]
    # What a killed earlier run of group 0 left (a half-written file) is cleared when it runs again.
    left_over = staged_file(staging, 0, "killed_mid_write").with_suffix(".npz.tmp")
    left_over.parent.mkdir(parents=True)
    left_over.write_bytes(b"PK\x03\x04")
    for group in range(len(groups)):
        assert main(["build", "group", *cfg, "--staging", str(staging), "--group", str(group)]) == 0
    assert main(["build", "group", *cfg, "--staging", str(staging), "--group", "3"]) == 2  # no such group
    assert not left_over.exists()
    records = []
    for part in range(len(built["parts"])):
        out = tmp_path / f"part-{part}.json"
        assert main(["build", "part", *cfg, "--store", str(path), "--part", str(part), "--staging", str(staging),
                     "--out", str(out)]) == 0
        records.append(json.loads(out.read_text()))
    one_step = [json.loads(json.dumps(r, sort_keys=True)) for r in built["parts"]]
    assert [r["checksums"] for r in records] == [r["checksums"] for r in one_step]
    assert records == one_step

    # A part whose site's staged sample is gone: the error names the file, the site, the group.
    lost_site = built["opened"].site_ids()[4]
    [lost_group] = [g for g, samples in enumerate(groups) if 4 in samples]
    staged_file(staging, lost_group, lost_site).unlink()
    shard = path / "s2" / "data" / "c" / "1" / "0" / "0" / "0"
    before = shard.read_bytes()
    with pytest.raises(DataError) as failure:
        store.build_part(path, built["opened"], config, 1, staging)
    text = str(failure.value)
    assert lost_site in text and f"group {lost_group}" in text and "xstars build group" in text, text
    assert shard.read_bytes() == before
    # Without groups there is no group to build.
    no_groups = built["config"] | {"build": {**built["config"]["build"], "sites_per_group": 0}}
    plain = ["--config-json", json.dumps(no_groups), "--manifest", str(manifest_path)]
    assert main(["build", "group", *plain, "--staging", str(staging), "--group", "0"]) == 2


def test_locality_groups_are_squares_of_neighbours_on_a_grid() -> None:
    from xstars.staging import locality_groups

    cells = [(col, row) for col in range(10, 18) for row in range(-4, 4)]  # 8 x 8 cells, store order by column
    groups = locality_groups(cells, 16)
    assert sorted(i for g in groups for i in g) == list(range(64))
    for group in groups:  # Z-order: each group of 16 is a 4 x 4 square
        cols, rows = {cells[i][0] for i in group}, {cells[i][1] for i in group}
        assert len(cols) == 4 and len(rows) == 4, sorted(cells[i] for i in group)
    with pytest.raises(DataError, match="sites_per_group"):
        locality_groups(cells, 0)
