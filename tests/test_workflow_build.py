"""`snakemake build_dataset` on the demo world: catalog, store, then a frozen rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pytest

from tests.conftest import WorkflowRun, snakemake, world_configfile
from xstars.demo import control


@pytest.mark.slow
def test_build_dataset_runs_the_catalog_and_the_store_then_rebuilds_frozen(
        demo_build: WorkflowRun, demo_root: Path, demo_server, tmp_path: Path) -> None:
    first = demo_build.workdir  # the session's local build (conftest.demo_build)
    out = demo_build.result.stdout + demo_build.result.stderr
    for rule in ("sites", "search_shard", "manifest", "store_init", "build_group", "build_part", "dataset"):
        assert f"rule {rule}:\n" in out, rule
    # The groups' staged samples are temporary: gone once every part has packed its shard.
    assert out.count("rule build_group:\n") == 3 and not list((first / "results" / "dataset").glob("staging/*"))
    # The WMS's rate limit is shared: a resource caps the jobs querying it (max_concurrent_jobs).
    assert 'wms_jobs_geoplateforme=Resource("wms_jobs_geoplateforme", 2)' in out  # the demo world's
    manifest = first / "results" / "catalog" / "manifest.parquet"
    frame = gpd.read_parquet(manifest)
    assert frame.site_id.nunique() == 8 and set(frame.sensor) == {"s2", "l8", "ign", "spot", "labels"}
    # The servers were up before the run: the workflow leaves them running.
    assert control.health(demo_server.base_url) is not None

    # Frozen: same manifest, no search job, no request to the catalogue; and each part reading
    # its own sites (no locality group): the same store.
    control.reset_stats(demo_server)
    second = tmp_path / "second"
    second.mkdir()
    configfile = world_configfile(tmp_path / "second.yaml", demo_root, demo_server,
                                  overlay={"build": {"sites_per_group": 0}}, manifest=str(manifest))
    result = snakemake(second, "build_dataset", "--configfile", str(configfile))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "rule search_shard:" not in result.stdout + result.stderr
    assert "rule build_group:" not in result.stdout + result.stderr
    assert (second / "results" / "catalog" / "manifest.parquet").read_bytes() == manifest.read_bytes()
    assert control.get_stats(demo_server)["requests"]["stac_search"] == 0
    # ...and the same dataset.
    import zarr

    a = zarr.open_group(str(demo_build.store), mode="r")
    b = zarr.open_group(str(second / "results" / "dataset" / "dataset.zarr"), mode="r")
    for sensor in set(frame.sensor):
        for name in ("data", "valid", "site_id", "item_id"):
            assert (a[sensor][name][:] == b[sensor][name][:]).all(), (sensor, name)
    assert a.attrs["xstars"]["shard_sha256"] == b.attrs["xstars"]["shard_sha256"]
    summary = json.loads((second / "results" / "dataset" / "summary.json").read_text())
    assert summary["kept"] + sum(summary["dropped_by_reason"].values()) == 8


@pytest.mark.slow
def test_pretrain_and_evaluate_rules_on_the_built_store(demo_build: WorkflowRun) -> None:
    """`snakemake evaluate` after the build: a (tiny) pretraining run, the random floor, the
    probes of every model, the table and the figures of the report."""
    result = snakemake(demo_build.workdir, "evaluate", "--configfile", str(demo_build.configfile))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    for rule in ("pretrain_run", "evaluate_model", "evaluate_report"):
        assert f" {rule}:\n" in out, rule
    for rule in ("sites", "build_part", "dataset"):
        assert f" {rule}:\n" not in out, f"{rule} ran again: the build was up to date"
    results = demo_build.workdir / "results"
    table = (results / "evaluate" / "results.md").read_text()
    assert "| random |" in table and "| xstars_dense |" in table and "probe seeds [0, 1, 2]" in table
    for figure in ("label_efficiency.png", "retrieval_examples.png"):
        assert (results / "evaluate" / figure).stat().st_size > 10_000
    # The demo world's public benchmarks, on the fake copies the workflow generated.
    assert " demo_benchmarks:\n" in out
    for row in ("| eurosat (fake) | xstars_dense | linear acc. |", "| bigearthnet (fake) | random | mAP |",
                "| flair (fake) | random | mIoU |"):
        assert row in table, row
    assert "FAKE copy" in table and "benchmark:flair (fake)" in (results / "evaluate" / "results.csv").read_text()
    metrics = (results / "pretrain" / "xstars_dense" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["msad"] > 0
