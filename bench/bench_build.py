"""Benchmark of the build stage on the demo world: speed against a plain baseline, I/O floor, memory.

Issue 4 asks, on the same manifest and in the same run:

* tiles per second per core of the whole build stage (``xstars``: store init, every part with
  co-registration, finalize; one process, so one core) against the way a user would write it
  without this project (``baseline``: per site, ``odc.stac.load`` of each STAC sensor on the
  footprint grid, a GetMap for IGN, then ``xarray.Dataset.to_zarr`` into one group per site);
  target >= 2x the baseline;
* the I/O floor (``io_floor``): only reading the source windows the build needs (every band,
  mask and GetMap, with the build's ``read_threads``; no warp, no co-registration, no write);
  target: build <= 1.5x the floor;
* peak memory of one build worker (a part job) for two sizes of the build (all sites, and the
  first third of them) with the same part size: it must not grow with the number of sites.

Each measurement runs in a fresh child process (GDAL's cache does not carry over) and reports
its own wall time, CPU time and peak RSS. Needs the demo world served and its manifest::

    .venv/bin/xstars demo up --world demo
    .venv/bin/python bench/bench_build.py --manifest results/demo/catalog/manifest.parquet

A tile is one site seen by one sensor (one per sensor of the config and site).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, manifest_path, workdir, config_json, extra = sys.argv[1:6]
config = json.loads(config_json)
extra = json.loads(extra)
from xstars.manifest import Manifest
from xstars import store
manifest = Manifest(Path(manifest_path))
if extra.get("first_sites"):
    manifest = manifest.subset(manifest.site_ids()[: extra["first_sites"]], Path(workdir) / "subset.parquet")
frame = manifest.frame()
ok = frame[frame.status == "ok"]
if mode == "one_part":  # what the part job reads: its own sites only
    first_part = store.stored_sites(manifest)[: config["build"]["samples_per_shard"]]
    ok = ok[ok.site_id.isin(first_part)]
if mode in ("io_floor", "baseline"):  # the items the rows name, by sensor and id
    items = {sensor: manifest.items(sensor).get(list(rows.item_id)) for sensor, rows in ok.groupby("sensor")}
started = time.perf_counter()
if mode == "xstars":
    path = Path(workdir) / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    parts = [store.build_part(path, manifest, config, k) for k in range(store.n_parts(n, config["build"]["samples_per_shard"]))]
    store.finalize(path, manifest, parts, config)
elif mode == "one_part":
    path = Path(workdir) / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    store.build_part(path, manifest, config, 0)
elif mode == "io_floor":
    from concurrent.futures import ThreadPoolExecutor
    from xstars.acquire import read_sources, site_grid
    from xstars.remote import WmsClient
    from xstars.sensors import sensors_of
    sensors = sensors_of(config)
    clients = {s.catalog_name: WmsClient(s.catalog_cfg, config["http"]) for s in sensors.values()
               if s.kind == "wms_layers"}
    def fetch(row):
        sensor = sensors[row.sensor]
        grid = site_grid(row.geometry.bounds, sensor.gsd_m, config["sites"]["crs"])
        return read_sources(sensor, items[row.sensor][row.item_id], grid, config, config["build"]["margin_m"],
                            clients.get(sensor.catalog_name))
    with ThreadPoolExecutor(max_workers=config["build"]["read_threads"]) as pool:  # as the build reads
        list(pool.map(fetch, ok.itertuples()))
elif mode == "baseline":
    import numpy as np, pystac, requests, rasterio, xarray as xr
    import planetary_computer
    from odc.geo.geobox import GeoBox
    from odc.stac import configure_rio, load
    from rasterio.io import MemoryFile
    from xstars.remote import use_token_endpoint
    from xstars.sensors import sensors_of
    sensors = sensors_of(config)
    if config["http"].get("proxy"):  # the demo's blob storage hosts are reached through its gateway
        configure_rio(GDAL_HTTP_PROXY=config["http"]["proxy"])
    out = Path(workdir) / "baseline.zarr"
    for site_id, rows in ok.groupby("site_id"):
        for row in rows.itertuples():
            item = items[row.sensor][row.item_id]
            sensor = sensors[row.sensor]
            if sensor.kind == "wms_layers":  # no STAC for a WMS: one GetMap per layer, as the manifest has it
                layers = []
                for key in sensor.layers_needed():
                    with MemoryFile(requests.get(item["assets"][key]["href"], timeout=60).content) as mem, mem.open() as img:
                        layers.append(img.read())
                data = np.concatenate(layers)
                ds = xr.Dataset({"data": (("band", "y", "x"), data)})
            else:
                bands = sensor.assets()
                geobox = GeoBox.from_bbox(row.geometry.bounds, crs=config["sites"]["crs"], resolution=sensor.gsd_m)
                signed = sensor.catalog_cfg["signing"] == "planetary_computer"
                if signed and sensor.catalog_cfg.get("token_url"):
                    use_token_endpoint(sensor.catalog_cfg["token_url"])
                ds = load([pystac.Item.from_dict(item)], bands=bands, geobox=geobox, resampling="bilinear",
                          patch_url=planetary_computer.sign if signed else None)  # as the PC's docs show
                ds = ds.drop_vars("spatial_ref", errors="ignore")
            ds.to_zarr(out, group=f"{row.sensor}/{site_id}", mode="w", zarr_format=3)
wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"mode": mode, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                  "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "sites": int(ok.site_id.nunique()),
                  "tiles": int(len(ok))}))
"""


def run(mode: str, manifest: Path, config: dict, **extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-c", CHILD, mode, str(manifest), tmp, json.dumps(config),
                                 json.dumps(extra)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["tiles_per_s"] = round(figures["tiles"] / figures["wall_s"], 3)
    figures["tiles_per_cpu_s"] = round(figures["tiles"] / figures["cpu_s"], 3)
    print(json.dumps(figures | extra), flush=True)
    return figures


def main() -> int:
    from xstars.config import load_config
    from xstars.demo.control import ensure_up

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, default=Path("results/demo/catalog/manifest.parquet"))
    parser.add_argument("--world", default="demo")
    args = parser.parse_args()
    # Every mode runs in one process, the parts one after the other: it has the WMS to itself.
    config = load_config(None, {"world": args.world, "catalogs": {"geoplateforme": {"max_concurrent_jobs": 1}}})
    demo = config["demo"]
    ensure_up(Path(demo["root"]), demo["host"], demo["port"], demo["stac_backend_port"], token_ttl_s=demo["token_ttl_s"])
    started = time.perf_counter()
    xstars = run("xstars", args.manifest, config)
    baseline = run("baseline", args.manifest, config)
    floor = run("io_floor", args.manifest, config)
    n_sites = xstars["sites"]
    n_small = max(1, (n_sites + 1) // 3)
    small = run("one_part", args.manifest, config, first_sites=n_small)
    large = run("one_part", args.manifest, config)
    summary = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "speedup_vs_baseline_wall": round(xstars["tiles_per_s"] / baseline["tiles_per_s"], 2),
        "speedup_vs_baseline_per_cpu_s": round(xstars["tiles_per_cpu_s"] / baseline["tiles_per_cpu_s"], 2),
        "build_over_io_floor": round(xstars["wall_s"] / floor["wall_s"], 2),
        "part_peak_rss_mb": {f"build of {n_small} sites": small["peak_rss_mb"],
                             f"build of {n_sites} sites": large["peak_rss_mb"]},
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
