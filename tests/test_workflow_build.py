"""`snakemake build_dataset` on the demo world: catalog, store, then a frozen rebuild."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
import yaml

from tests.conftest import SMALL_DEMO
from xstars.demo import server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args],
        env=env, capture_output=True, text=True, timeout=900, check=False)


def world_configfile(path: Path, demo_root: Path, info: server.ServerInfo, **extra) -> Path:
    overlay = {
        "results_dir": "results",
        # Snakemake may replace the overlay from config.yaml rather than merge into it: name the
        # endpoints too.
        "stac": {"url": "http://{demo.host}:{demo.port}/stac", "backoff_s": 0.05},
        "ign": {"wms_url": "http://{demo.host}:{demo.port}/wms"},
        "demo": {**SMALL_DEMO, "root": str(demo_root), "port": info.port, "stac_backend_port": info.backend_port},
        "sites": {"cities": ["toulouse", "bordeaux"], "footprint_m": 240, "city_radius_m": 360, "sites_per_city": 4,
                  "split": {"method": "cities", "val_cities": [], "test_cities": ["bordeaux"]}},
        "catalog": {"search_shards": 2, "search_cell_m": 4800, **extra},
        "build": {"samples_per_shard": 3, "margin_m": 240},
    }
    path.write_text(yaml.safe_dump({"world": "demo", "worlds": {"demo": overlay}}))
    return path


@pytest.mark.slow
def test_build_dataset_runs_the_catalog_and_the_store_then_rebuilds_frozen(demo_root: Path, demo_server, tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    configfile = world_configfile(tmp_path / "first.yaml", demo_root, demo_server)
    result = snakemake(first, "build_dataset", "--configfile", str(configfile))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for rule in ("sites", "search_shard", "manifest", "store_init", "build_part", "dataset"):
        assert f" {rule}:\n" in result.stdout + result.stderr, rule  # rule or checkpoint
    manifest = first / "results" / "catalog" / "manifest.parquet"
    frame = gpd.read_parquet(manifest)
    assert frame.site_id.nunique() == 8 and set(frame.sensor) == {"s2", "l8", "ign", "labels"}
    # The servers were up before the run: the workflow leaves them running.
    assert server.health(demo_server.base_url) is not None

    # Frozen: same manifest, no search job, no request to the catalogue.
    server.reset_stats(demo_server)
    second = tmp_path / "second"
    second.mkdir()
    configfile = world_configfile(tmp_path / "second.yaml", demo_root, demo_server, manifest=str(manifest))
    result = snakemake(second, "build_dataset", "--configfile", str(configfile))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "rule search_shard:" not in result.stdout + result.stderr
    assert (second / "results" / "catalog" / "manifest.parquet").read_bytes() == manifest.read_bytes()
    assert server.get_stats(demo_server)["requests"]["stac_search"] == 0
    # ...and the same dataset.
    import zarr

    a = zarr.open_group(str(first / "results" / "dataset" / "dataset.zarr"), mode="r")
    b = zarr.open_group(str(second / "results" / "dataset" / "dataset.zarr"), mode="r")
    for sensor in ("s2", "l8", "ign", "labels"):
        for name in ("data", "valid", "site_id", "item_id"):
            assert (a[sensor][name][:] == b[sensor][name][:]).all(), (sensor, name)
    summary = json.loads((second / "results" / "dataset" / "summary.json").read_text())
    assert summary["kept"] + sum(summary["dropped_by_reason"].values()) == 8
