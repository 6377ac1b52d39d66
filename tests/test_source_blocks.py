"""What a build reads from the COGs (xstars.source_blocks), checked against the files and the
bytes the demo's file server really sent for a part (issue 14's I/O measurement)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
from rasterio.windows import Window

from tests.test_catalog import build_manifest, small_world_config
from xstars import items as stac_items
from xstars import store
from xstars.demo import control
from xstars.manifest import Manifest
from xstars.remote import source_window
from xstars.sensors import sensors_of
from xstars.source_blocks import asset_reads, blocks_touched, part_reads

PER_PART = 4


def test_blocks_touched_are_those_a_window_overlaps() -> None:
    assert blocks_touched(Window(0, 0, 1, 1), 128, 128) == [(0, 0)]
    assert blocks_touched(Window(127, 127, 2, 2), 128, 128) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert blocks_touched(Window(128, 0, 128, 128), 128, 128) == [(0, 1)]  # ends on a block edge
    assert blocks_touched(Window(1000, 2040, 30, 4), 1024, 1024) == [(1, 0), (1, 1)]
    assert blocks_touched(Window(1000, 2040, 30, 10), 1024, 1024) == [(1, 0), (1, 1), (2, 0), (2, 1)]


@pytest.fixture(scope="module")
def catalogued(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory) -> dict:
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, build={"samples_per_shard": PER_PART, "margin_m": 240})
    path = tmp_path_factory.mktemp("blocks") / "manifest.parquet"
    build_manifest(config, path)
    return {"config": config, "manifest": Manifest(path)}


def local_file(demo_root: Path, href: str) -> Path:
    from xstars.demo.layout import local_path

    return local_path(demo_root, href)


def test_the_windows_from_the_items_are_those_the_build_reads_from_the_files(catalogued, demo_root: Path) -> None:
    """Computed from the STAC items alone (proj:transform, proj:shape), each window is the one
    the build computes from the file's own header (xstars.remote.read_source)."""
    from xstars.acquire import site_grid

    config, manifest = catalogued["config"], catalogued["manifest"]
    sensors = sensors_of(config)
    plan = store.plan_part(manifest, config, 0)
    checked = 0
    for rows in plan.sites:
        for name, row in rows.items():
            sensor = sensors[name]
            if row.status != "ok" or sensor.kind == "wms_layers":
                continue
            item = plan.items[name][row.item_id]
            reads = asset_reads(sensor, item, row.bounds, config)
            assert reads, (name, row.item_id)
            grid = site_grid(row.bounds, sensor.gsd_m, config["sites"]["crs"])
            margin_m = float(config["build"]["margin_m"]) if sensor.is_image else 0.0
            assert [read.href for read in reads] == [item["assets"][key]["href"] for key in sensor.assets()]
            for key, read in zip(sensor.assets(), reads, strict=True):
                gsd = stac_items.asset_gsd_m(item, item["assets"][key]) or sensor.gsd_m
                with rasterio.open(local_file(demo_root, read.href)) as src:
                    expected = source_window(src.transform, src.width, src.height, src.crs, grid,
                                             math.ceil(margin_m / gsd) + 2)
                    assert read.window == expected, (read.href, read.window, expected)
                    assert (read.width, read.height) == (src.width, src.height)
                checked += 1
    assert checked >= 8


def test_a_parts_block_minimum_is_below_what_it_fetched_and_close_to_it(catalogued, demo_root: Path,
                                                                        demo_server: control.ServerInfo,
                                                                        tmp_path: Path) -> None:
    """The blocks a part's windows touch, summed with their real compressed sizes, are a lower
    bound of the bytes the file server sent while the part was built, and most of them: the
    build fetches blocks, little else."""
    config, manifest = catalogued["config"], catalogued["manifest"]
    sensors = sensors_of(config)
    plan = store.plan_part(manifest, config, 0)
    blocks: set[tuple[str, int, int]] = set()
    for reads in part_reads(plan.sites, plan.items, sensors, config):
        for read in reads:
            with rasterio.open(local_file(demo_root, read.href)) as src:
                height, width = src.block_shapes[0]
            blocks |= {(read.href, r, c) for r, c in blocks_touched(read.window, height, width)}
    sizes = 0
    for href, r, c in blocks:
        with rasterio.open(local_file(demo_root, href)) as src:
            sizes += src.block_size(1, r, c)
    path = tmp_path / "dataset.zarr"
    store.init_store(path, manifest, config)
    control.reset_stats(demo_server)
    # In its own process, as the workflow runs a part: GDAL's fetch cache starts empty (this
    # process's may hold the blocks from earlier tests).
    code = ("import json, sys; from pathlib import Path; from xstars import store; from xstars.manifest import Manifest;"
            " store.build_part(Path(sys.argv[2]), Manifest(Path(sys.argv[1])), json.loads(sys.argv[3]), 0)")
    subprocess.run([sys.executable, "-c", code, str(manifest.path), str(path), json.dumps(config)], check=True,
                   capture_output=True, text=True, timeout=600)
    fetched = control.get_stats(demo_server)["file_bytes"]
    assert sizes > 0 and sizes <= fetched, (sizes, fetched)
    files = {href for href, _, _ in blocks}
    # What is not blocks is headers (GDAL reads at least 16 KiB on open) and the rounding of
    # ranges to GDAL's 16 KiB chunks.
    assert fetched <= sizes + len(files) * 2 * 16384 + len(blocks) * 16384, (sizes, fetched, len(files))
