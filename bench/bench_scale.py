"""Scale plan (issue 7): per-site costs measured on the demo world, extrapolated to all of France.

Runs the catalog (every search shard, then the selection) and the build (store init, every
part, finalize) of the demo world in this process, as the workflow's jobs do, and measures per
stage: CPU-seconds (this process, all threads), requests per route and bytes served by the
demo servers (COG ranges and GetMap images), and bytes stored (per sensor). The demo servers
run in another process: their CPU is not counted (on the real services it is not ours).

The extrapolation is a model, printed with its assumptions: bytes read and CPU scale with the
pixels read (the footprint plus ``build.margin_m`` on each side; the catalog's mask reads with
the footprint), bytes stored with the footprint's pixels, requests do not scale (one window
read per asset and site, one GetMap per layer and site, whatever the size); STAC searches are
counted exactly from the France sites' search groups. Wall time on N nodes is the larger of
the CPU time spread over the nodes' cores and the IGN WMS limit (40 requests/s, global).

    .venv/bin/xstars demo up --world demo
    .venv/bin/python bench/bench_scale.py [--nodes 1 4 16 64] [--cores-per-node 32]

With ``--jobs DIR`` it simulates instead the jobs that need no network at France size, today's
code beside this one (issue 15; bench/scale_jobs.py says how), and prints their table:

    .venv/bin/python bench/bench_scale.py --jobs /tmp/france [--baseline-ref 058577c] [--old-shards 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from xstars.sensors import sensors_of

#: The France-wide build of README.md ("All of France"), on top of config.yaml.
FRANCE = {"sites": {"uniform_count": 30000}, "build": {"samples_per_shard": 64, "sites_per_group": 1024},
          "catalog": {"search_shards": 64}, "http": {"cache_mb": 1024}}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(stage, url: str) -> dict:
    from xstars.demo import control

    control.reset_stats(url)
    cpu, wall = cpu_seconds(), time.perf_counter()
    stage()
    stats = control.get_stats(url)
    return {"cpu_s": cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall, "requests": stats["requests"],
            "bytes_read": stats["file_bytes"] + stats["wms_bytes"], "wms_bytes": stats["wms_bytes"]}


def run_demo(config: dict, workdir: Path) -> dict:
    """The catalog then the build of ``config`` (the demo world), measured stage by stage."""
    from xstars import catalog, store
    from xstars.demo.control import read_server_json
    from xstars.manifest import Manifest
    from xstars.sites import sample_sites

    url = read_server_json(Path(config["demo"]["root"])).base_url
    sites = sample_sites(config)
    manifest_path = workdir / "manifest.parquet"

    def catalog_stage() -> None:
        catalog.build_manifest(config, sites, manifest_path)

    path = workdir / "dataset.zarr"

    def build_stage() -> None:
        manifest = Manifest(manifest_path)
        n = store.init_store(path, manifest, config)
        parts = [store.build_part(path, manifest, config, k)
                 for k in range(store.n_parts(n, config["build"]["samples_per_shard"]))]
        store.finalize(path, manifest, parts, config)

    figures = {"sites": len(sites), "catalog": measure(catalog_stage, url), "build": measure(build_stage, url)}
    figures["stored_bytes"] = {s: sum(f.stat().st_size for f in (path / s).rglob("*") if f.is_file())
                               for s in sensors_of(config)}
    figures["kept"] = int((Manifest(manifest_path).frame().drop_duplicates("site_id").status == "ok").sum())
    return figures


def plan(demo: dict, demo_config: dict, real: dict, nodes: list[int], cores_per_node: int) -> dict:
    """Extrapolate the demo's per-site figures to ``real`` (a validated config)."""
    from xstars.catalog import search_groups, season_windows
    from xstars.sites import sample_sites

    def read_side(cfg: dict) -> float:
        return cfg["sites"]["footprint_m"] + 2 * cfg["build"]["margin_m"]

    read_factor = (read_side(real) / read_side(demo_config)) ** 2
    footprint_factor = (real["sites"]["footprint_m"] / demo_config["sites"]["footprint_m"]) ** 2
    n = demo["sites"]
    sites = sample_sites(real)
    windows = len(season_windows(real["dates"]))
    # One search per group and window for each scene sensor, one per group for the labels.
    kinds = [s.kind for s in sensors_of(real).values()]
    searches = len(search_groups(sites, real["catalog"]["search_cell_m"])) * (
        kinds.count("stac_raster") * windows + kinds.count("stac_labels"))
    per_site = {
        "catalog_cpu_s": demo["catalog"]["cpu_s"] / n * footprint_factor,
        "build_cpu_s": demo["build"]["cpu_s"] / n * read_factor,
        "catalog_bytes": demo["catalog"]["bytes_read"] / n * footprint_factor,
        "build_bytes": demo["build"]["bytes_read"] / n * read_factor,
        "stored_bytes": sum(demo["stored_bytes"].values()) / n * footprint_factor,
        "wms_requests": (demo["catalog"]["requests"].get("wms_getmap", 0)
                         + demo["build"]["requests"].get("wms_getmap", 0)) / n,
    }
    total_cpu_s = len(sites) * (per_site["catalog_cpu_s"] + per_site["build_cpu_s"])
    wms_requests = len(sites) * per_site["wms_requests"]
    wms_floor_s = wms_requests / real["catalogs"]["geoplateforme"]["max_requests_per_s"]
    return {
        "sites": len(sites), "tiles": len(sites) * len(sensors_of(real)), "stac_searches": searches,
        "read_area_factor": round(read_factor, 2), "footprint_area_factor": round(footprint_factor, 2),
        "per_site": {k: round(v, 3) for k, v in per_site.items()},
        "tb_read": round(len(sites) * (per_site["catalog_bytes"] + per_site["build_bytes"]) / 1e12, 3),
        "tb_stored": round(len(sites) * per_site["stored_bytes"] / 1e12, 3),
        "core_hours": round(total_cpu_s / 3600, 1),
        "wms_requests": round(wms_requests), "wms_floor_h": round(wms_floor_s / 3600, 2),
        "wall_h": {f"{k} nodes x {cores_per_node} cores": round(max(total_cpu_s / (k * cores_per_node), wms_floor_s)
                                                                 / 3600, 2) for k in nodes},
    }


def main() -> None:
    from xstars.config import load_config
    from xstars.demo.control import ensure_up

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--jobs", type=Path, metavar="DIR",
                        help="simulate the France-size jobs in DIR (issue 15) instead of the demo's plan")
    parser.add_argument("--baseline-ref", default="058577c",
                        help="today's code for --jobs: the last commit with the item JSON in every row")
    parser.add_argument("--old-shards", type=int, default=4,
                        help="--jobs: shards written in today's layout too (the merge is compared on them)")
    args = parser.parse_args()
    if args.jobs:
        return france_jobs(args)
    # One process, the jobs one after the other: it has the WMS to itself.
    demo_config = load_config(None, {"world": "demo", "catalogs": {"geoplateforme": {"max_concurrent_jobs": 1}}})
    demo_cfg = demo_config["demo"]
    ensure_up(Path(demo_cfg["root"]), demo_cfg["host"], demo_cfg["port"], demo_cfg["stac_backend_port"],
              token_ttl_s=demo_cfg["token_ttl_s"])
    with tempfile.TemporaryDirectory() as tmp:
        demo = run_demo(demo_config, Path(tmp))
    print(json.dumps({"demo": demo, "date": date.today().isoformat(),
                      "machine": f"{platform.processor() or platform.machine()}, {platform.system()}"}, indent=1))
    for name, overrides in (("default config", {}), ("all of France", FRANCE)):
        real = load_config(None, overrides)
        print(json.dumps({"plan": name, **plan(demo, demo_config, real, args.nodes, args.cores_per_node)}, indent=1))


def france_jobs(args: argparse.Namespace) -> None:
    """The France-size jobs' table (issue 15), as JSON then as Markdown rows for BENCHMARKS.md."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale_jobs import simulate

    from xstars.config import load_config

    config = load_config(None, FRANCE)
    started = time.perf_counter()
    result = simulate(config, args.jobs, args.baseline_ref, args.old_shards)
    result |= {"date": date.today().isoformat(), "baseline_ref": args.baseline_ref,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
               "bench_wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=1))
    print("| job | today: peak MB | today: s | after: peak MB | after: s |\n|---|---:|---:|---:|---:|")
    for name, row in result["jobs"].items():
        today = row["today"] or {"peak_mb": "-", "seconds": "-"}
        print(f"| {name} | {today['peak_mb']} | {today['seconds']} | {row['after']['peak_mb']} | {row['after']['seconds']} |")


if __name__ == "__main__":
    main()
