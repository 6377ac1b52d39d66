"""build_dataset: from the manifest to the Zarr store, on the demo world's real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_catalog import build_manifest, small_world_config
from xstars import store
from xstars.catalog import read_manifest
from xstars.demo import server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(demo_root: Path, demo_server: server.ServerInfo, tmp_path_factory) -> dict:
    server.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, build={"samples_per_shard": 3, "margin_m": 240})
    return build_store(config, tmp_path_factory.mktemp("build"))


def build_store(config: dict, folder: Path) -> dict:
    """Catalog then store, in `folder`, through the library (no workflow): what tests build on."""
    build_manifest(config, folder / "manifest.parquet")
    manifest = read_manifest(folder / "manifest.parquet")
    path = folder / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    per_shard = config["build"]["samples_per_shard"]
    parts = [store.build_part(path, manifest, config, k) for k in range(store.n_parts(n, per_shard))]
    summary = store.finalize(path, manifest, parts, config)
    return {"config": config, "manifest": manifest, "folder": folder, "path": path, "parts": parts,
            "summary": summary, "n": n}


def config_sensors(built: dict) -> list[str]:
    from xstars.sensors import sensors_of

    return list(sensors_of(built["config"]))


def test_store_layout_is_readable_with_xarray_and_rioxarray(built) -> None:
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    n = built["n"]
    assert n == built["manifest"].loc[built["manifest"].status == "ok"].site_id.nunique()
    sizes = {"s2": (10, 24), "l8": (7, 8), "ign": (4, 240), "labels": (1, 24)}
    for sensor, (bands, size) in sizes.items():
        ds = xr.open_zarr(built["path"], group=sensor, decode_coords="all")
        assert ds.data.shape == (n, bands, size, size), sensor
        assert list(ds.site_id.values) == store.stored_sites(built["manifest"])  # same sample order everywhere
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
    assert set(figures) == {"s2->ign", "l8->ign"}
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

    config, manifest = built["config"], built["manifest"]
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
    summary = store.finalize(built["path"], built["manifest"], legacy, built["config"])
    assert summary["normalization"] == built["summary"]["normalization"]


def test_completeness_check_names_a_missing_part(built) -> None:
    from xstars.errors import DataError

    with pytest.raises(DataError, match=r"samples \[.*\] were written by no part"):
        store.finalize(built["path"], built["manifest"], built["parts"][1:], built["config"])


def test_an_unreadable_scene_falls_back_to_the_next_one(built) -> None:
    config, manifest = built["config"], built["manifest"].copy()
    site = store.stored_sites(manifest)[0]
    row = manifest.index[(manifest.site_id == site) & (manifest.sensor == "s2")][0]
    fallbacks = json.loads(manifest.at[row, "fallbacks_json"])
    assert fallbacks, "the small world keeps fallbacks for every S2 choice"
    broken = json.loads(manifest.at[row, "item_json"])
    broken["assets"]["B04"]["href"] = broken["assets"]["B04"]["href"].replace("B04.tif", "B04-missing.tif")
    manifest.at[row, "item_json"] = json.dumps(broken)
    path = built["folder"] / "fallback.zarr"
    store.init_store(path, manifest, config)
    record = store.build_part(path, manifest, config, 0)["records"][0]
    assert record["site_id"] == site and record["status"] == "ok"
    assert record["fallbacks_tried"]["s2"] == 1
    assert record["items"]["s2"] == fallbacks[0]["item_id"]


def test_a_403_is_answered_by_signing_again(built, demo_server: server.ServerInfo, monkeypatch) -> None:
    """An expired token (HTTP 403 AuthenticationFailed) makes the read sign the href afresh."""
    from xstars import acquire, remote

    signed = []
    real_sign = remote.sign_href
    monkeypatch.setattr(remote, "sign_href", lambda href, signing, fresh=False, **kw: signed.append(fresh) or
                        real_sign(href, signing, fresh=fresh, **kw))
    config = built["config"]
    row = built["manifest"][(built["manifest"].status == "ok") & (built["manifest"].sensor == "l8")].iloc[0]
    item = json.loads(row.item_json)
    server.set_faults(demo_server, {"status_403_every": 1, "routes": ["files"]})
    try:
        grid = acquire.site_grid(row.geometry.bounds, 30, "EPSG:2154")
        href = item["assets"]["red"]["href"].replace("red.tif", "red.tif?st=x&se=y&sig=SECRET")
        pc = config["catalogs"]["planetary_computer"]
        with pytest.raises(remote.ServiceError) as failure:
            remote.read_source(href, grid, catalog_cfg=pc, http_cfg=config["http"] | {"max_retries": 2}, what="x/red")
        assert "SECRET" not in str(failure.value) and "403" in str(failure.value)
        assert signed == [False, True, True]  # every retry after a 403 asked for a fresh token
        server.set_faults(demo_server, {"status_403_every": 2, "routes": ["files"]})
        signed.clear()
        source = remote.read_source(item["assets"]["red"]["href"], grid, catalog_cfg=pc, http_cfg=config["http"],
                                    what="x/red")
        assert source.data.size > 0 and server.get_stats(demo_server)["faults"]["status_403"] > 0
    finally:
        server.set_faults(demo_server, {})


BLOB = "http://xstarstest.blob.core.windows.net/files"


def on_blob_storage(built: dict, sensor: str = "s2") -> tuple[object, str]:
    """The manifest with the first kept site's `sensor` scenes (chosen and fallbacks) moved to a
    Planetary Computer blob host: the SDK signs them, asking its token endpoint."""
    manifest = built["manifest"].copy()
    files_url = f"http://127.0.0.1:{built['config']['demo']['port']}/files"
    site = next(s for s in store.stored_sites(manifest)[:3] if (manifest[manifest.site_id == s].status == "ok").all())
    row = manifest.index[(manifest.site_id == site) & (manifest.sensor == sensor)][0]
    for column in ("item_json", "fallbacks_json"):
        assert files_url in manifest.at[row, column]
        manifest.at[row, column] = manifest.at[row, column].replace(files_url, BLOB)
    return manifest, site


def test_a_site_whose_signing_keeps_failing_is_dropped_and_the_part_kept(built, token_endpoint, tmp_path) -> None:
    from tests.loopback import Answer

    config = built["config"] | {"http": {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 10}}
    manifest, site = on_blob_storage(built)
    token_server = token_endpoint(Answer(200, b"{}"))  # never a token
    path = tmp_path / "dataset.zarr"
    store.init_store(path, manifest, config)
    record = store.build_part(path, manifest, config, 0)  # the part is built, not killed
    by_site = {r["site_id"]: r for r in record["records"]}
    assert token_server.requests
    assert by_site[site]["status"] == "dropped" and by_site[site]["reason"].startswith("s2: no usable scene")
    chosen = json.loads(manifest[(manifest.site_id == site) & (manifest.sensor == "s2")].iloc[0].item_json)
    assert f"signing sentinel-2-l2a/{chosen['id']}/" in by_site[site]["reason"]
    others = [r for r in record["records"] if r["site_id"] != site]
    assert others and all(r["status"] == built["parts"][0]["records"][i]["status"]
                          for i, r in enumerate(record["records"]) if r["site_id"] != site)


def test_no_token_in_a_build_job_log_at_debug(built, demo_root: Path, tmp_path: Path) -> None:
    """`xstars build part` at DEBUG (GDAL's debug messages on) as a Snakemake job runs it: one
    site's Sentinel-2 scenes on blob storage, signed with a token holding SECRET, their files
    answering the header and failing every later range (GDAL names them with their query)."""
    from tests.loopback import Answer, range_answer, serve, token_answer

    config = built["config"] | {"http": {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 10}}
    manifest, site = on_blob_storage(built)
    manifest_path = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_path)
    path = tmp_path / "dataset.zarr"
    store.init_store(path, manifest, config)
    def files(request) -> Answer:
        """Every GDAL read goes through this proxy. The demo's files are small (one 32 KiB range
        holds a whole one): a signed href gets its first 8 KiB (the header) and no more, any
        later range fails."""
        answer = range_answer((demo_root / request.path.lstrip("/")).read_bytes(), request)
        if "sig=" not in request.query or answer.status != 206:
            return answer
        if not request.headers["range"].startswith("bytes=0-"):
            return Answer(500, b"busy")
        size = answer.headers["Content-Range"].rsplit("/", 1)[1]
        return Answer(206, answer.body[:8192], {"Content-Range": f"bytes 0-8191/{size}"})

    with serve(lambda request: token_answer()) as tokens, serve(files) as proxy:
        env = os.environ | {"PC_SDK_SAS_URL": f"{tokens.url}/api/sas/v1/token", "GDAL_HTTP_PROXY": proxy.proxy,
                            "CPL_DEBUG": "ON"}
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

    report = verify_store(built["path"], built["manifest"])
    assert report["ok"], report["problems"]
    assert report["shards_checked"] == sum(len(part["checksums"]) for part in built["parts"]) > 0
    # A flipped byte in one shard, and a manifest site the store does not hold: both named.
    copy = tmp_path / "dataset.zarr"
    shutil.copytree(built["path"], copy)
    shard = copy / "ign" / "data" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = built["manifest"].copy()
    extra = manifest[manifest.site_id == manifest.site_id.iloc[0]].copy()
    extra["site_id"] = "zz-not-built"
    import pandas as pd

    report = verify_store(copy, pd.concat([manifest, extra]))
    assert not report["ok"]
    assert any("ign/data/c/0/0/0/0: checksum differs" in p for p in report["problems"])
    assert any("missing ['zz-not-built']" in p for p in report["problems"])


def test_a_site_dropped_by_the_catalog_is_stored_with_its_reason(built: dict, tmp_path: Path) -> None:
    # The samples are the manifest's sites, dropped ones included: their count, hence the
    # build jobs, is known before the catalog runs (workflow/rules/common.smk plans them).
    import zarr

    from xstars.verify import verify_store

    config, manifest = built["config"], built["manifest"].copy()
    site = store.stored_sites(manifest)[1]
    manifest.loc[manifest.site_id == site, ["status", "reason"]] = ["dropped", "s2: no scene clear enough"]
    path = tmp_path / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    assert n == built["n"] == manifest.site_id.nunique()
    parts = [store.build_part(path, manifest, config, k) for k in range(store.n_parts(n, 3))]
    assert parts[0]["records"][1] | {"items": None} == parts[0]["records"][1] | {
        "site_id": site, "status": "dropped", "dropped_by": "catalog", "reason": "s2: no scene clear enough",
        "items": None}
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
