"""What the build really fetches from the COGs, against the block-aligned minimum (issue 14).

On the demo world served on loopback and its manifest, in one run, every job in its own process
as the workflow runs it (GDAL's caches start empty), the bytes the demo's file server sent:

* **parts in store order** (``build.sites_per_group = 0``): each part reads its own shard's sites;
* **locality groups** (``build.sites_per_group > 0``, :mod:`xstars.staging`), at each size of
  ``--group-sizes``: the group jobs read and stage, then the parts pack (checked: the same
  shards, byte for byte); the peak memory of each kind of job;
* beside each, its **minimum**: the blocks each job's sites touch (:mod:`xstars.source_blocks`,
  the build's own windows), once per job, with the files' real block sizes (compressed bytes,
  from their headers), plus one header per file per job;
* **block-aligned minimum**: every block any site touches, once for the whole build.

Per stored byte: the store's bytes on disk. Ratios are against the block-aligned minimum::

    .venv/bin/xstars demo up --world demo
    .venv/bin/python bench/bench_io.py --manifest results/demo/catalog/manifest.parquet --group-sizes 8 24 48
    .venv/bin/python bench/bench_io.py --france 64 256 512 1024 --cache-mb 256 512 1024   # all of France
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from xstars.staging import locality_groups  # the build's plan of reads by locality

PART = r"""
import json, resource, sys
from pathlib import Path
from xstars import store
from xstars.manifest import Manifest
manifest_path, store_path, config_json, part, staging = sys.argv[1:6]
store.build_part(Path(store_path), Manifest(manifest_path), json.loads(config_json), int(part),
                 Path(staging) if staging else None)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

GROUP = r"""
import json, resource, sys
from pathlib import Path
from xstars import store
from xstars.manifest import Manifest
manifest_path, staging, config_json, group = sys.argv[1:5]
store.build_group(Path(staging), Manifest(manifest_path), json.loads(config_json), int(group))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_job(code: str, *args: str) -> float:
    """Run one build job in its own process (GDAL's caches start empty); its peak RSS in MB."""
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def file_facts(hrefs: dict[str, str], config: dict) -> dict[str, dict]:
    """Per file: block shape and each block's compressed size (from its header, read once here
    through the build's own signing), and the bytes an open costs (the server's counter)."""
    import rasterio

    from xstars.demo import control
    from xstars.remote import gdal_options, sign_href
    from xstars.sensors import sensors_of

    url = control.read_server_json(Path(config["demo"]["root"])).base_url
    sensors = sensors_of(config)
    facts = {}
    for href, sensor in sorted(hrefs.items()):
        control.reset_stats(url)
        catalog_cfg = sensors[sensor].catalog_cfg
        signed = sign_href(href, catalog_cfg["signing"], http_cfg=config["http"], what=href,
                           token_url=catalog_cfg.get("token_url"))
        with rasterio.Env(**gdal_options(config["http"], href)), rasterio.open(signed) as src:
            opened = control.get_stats(url)["file_bytes"]
            height, width = src.block_shapes[0]
            n_rows, n_cols = -(-src.height // height), -(-src.width // width)
            sizes = {(r, c): block_bytes(src, r, c) for r in range(n_rows) for c in range(n_cols)}
        facts[href] = {"block": (height, width), "sizes": sizes, "header_bytes": opened}
    return facts


def block_bytes(src, row: int, col: int) -> int:
    """A block's compressed size; 0 for a block a sparse file never wrote (read as nodata, no fetch)."""
    from rasterio.errors import RasterBlockError

    try:
        return src.block_size(1, row, col)
    except RasterBlockError:
        return 0


def minimum(parts: list[list[list]], facts: dict[str, dict]) -> dict[str, int]:
    """Blocks once per part (plus one header per file per part), and once overall."""
    from xstars.source_blocks import blocks_touched

    per_part, headers, overall = 0, 0, set()
    for sites in parts:
        blocks, files = set(), set()
        for reads in sites:
            for read in reads:
                fact = facts[read.href]
                files.add(read.href)
                blocks |= {(read.href, *b) for b in blocks_touched(read.window, *fact["block"])}
        per_part += sum(facts[h]["sizes"][(r, c)] for h, r, c in blocks)
        headers += sum(facts[h]["header_bytes"] for h in files)
        overall |= blocks
    return {"blocks_bytes": per_part, "header_bytes": headers,
            "overall_blocks_bytes": sum(facts[h]["sizes"][(r, c)] for h, r, c in overall),
            "overall_header_bytes": sum(facts[h]["header_bytes"] for h in {h for h, _, _ in overall})}


# ------------------------------------------------------------------ all of France, by geometry


def france_blocks(part_sizes: Sequence[int], caches_mb: Sequence[float] = (256,)) -> dict:
    """The blocks every part of the France build touches (Sentinel-2, every asset the config
    reads, 1024-px blocks as the Planetary Computer's COGs have them), over the block-aligned
    minimum, for parts in store order and by locality, at several part sizes. By geometry only:
    tiles on the MGRS 100 km squares of each site's UTM zone (west and north edges, as the
    Sentinel-2 tiling grid has them), the build's windows (footprint, margin, 2 pixels)."""
    import numpy as np
    from bench_scale import FRANCE
    from pyproj import Transformer
    from scale_jobs import templates

    from xstars import items as stac_items
    from xstars.config import load_config
    from xstars.sensors import sensors_of
    from xstars.sites import sample_sites

    config = load_config(None, FRANCE)
    sites = sorted(sample_sites(config), key=lambda s: s.site_id)
    template = templates()["sentinel-2-l2a"]
    gsds = [stac_items.asset_gsd_m(template, template["assets"][key]) for key in sensors_of(config)["s2"].assets()]
    margin = float(config["build"]["margin_m"])
    bounds = np.array([s.bounds for s in sites])
    lon, _ = Transformer.from_crs(config["sites"]["crs"], "EPSG:4326", always_xy=True).transform(
        (bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2)
    zone = ((lon + 180) // 6 + 1).astype(int)
    xs, ys = np.zeros((len(sites), 4)), np.zeros((len(sites), 4))
    for z in np.unique(zone):  # the window's corners in the site's UTM zone
        mine = zone == z
        to_utm = Transformer.from_crs(config["sites"]["crs"], f"EPSG:{32600 + z}", always_xy=True)
        for k, (xi, yi) in enumerate([(0, 1), (2, 1), (0, 3), (2, 3)]):
            xs[mine, k], ys[mine, k] = to_utm.transform(bounds[mine, xi] + (margin if xi == 2 else -margin),
                                                        bounds[mine, yi] + (margin if yi == 3 else -margin))
    west = np.floor(xs.mean(axis=1) / 1e5) * 1e5
    north = np.ceil(ys.mean(axis=1) / 1e5) * 1e5

    def site_blocks(gsd: float) -> list[set]:
        side, pad = 1024 * gsd, 2 * gsd
        c0, c1 = ((xs.min(1) - pad - west) // side).astype(int), ((xs.max(1) + pad - west) // side).astype(int)
        r0, r1 = ((north - ys.max(1) - pad) // side).astype(int), ((north - ys.min(1) + pad) // side).astype(int)
        return [{(zone[i], west[i], north[i], r, c) for r in range(r0[i], r1[i] + 1) for c in range(c0[i], c1[i] + 1)}
                for i in range(len(sites))]

    # The build's own plan (xstars.staging.locality_groups) cuts the Z-order every `size` sites.
    orders = {"store order": list(range(len(sites))),
              "locality order": [i for group in locality_groups([(s.col, s.row) for s in sites], 1) for i in group]}
    by_gsd = {gsd: site_blocks(gsd) for gsd in sorted(set(gsds))}
    weight = {gsd: gsds.count(gsd) for gsd in by_gsd}  # assets at that resolution
    floor = sum(weight[g] * len(set().union(*blocks)) for g, blocks in by_gsd.items())
    out: dict = {"sites": len(sites), "assets_by_gsd_m": weight, "minimum_blocks": floor, "parts": {}}
    for size in part_sizes:
        for name, order in orders.items():
            total = 0
            for gsd, blocks in by_gsd.items():
                for start in range(0, len(order), size):
                    total += weight[gsd] * len(set().union(*(blocks[i] for i in order[start:start + size])))
            out["parts"][f"{size} sites a part, {name}"] = round(total / floor, 2)
            for cache_mb in caches_mb:
                out["parts"][f"{size} sites a part, {name}, through a {cache_mb:g} MB cache"] = round(
                    lru_fetches(order, size, by_gsd, weight, int(cache_mb / REAL_BLOCK_MB)) / floor, 2)
    out["block_mb_assumed"] = REAL_BLOCK_MB
    return out


#: A real Sentinel-2 L2A COG block (1024 x 1024 uint16, deflate): the files are 100-200 MB for
#: 121 blocks at 10 m, 40-60 MB for 36 at 20 m. An assumption, used for the cache's capacity only.
REAL_BLOCK_MB = 1.25


def lru_fetches(order: Sequence[int], size: int, by_gsd: dict, weight: dict, capacity: int) -> int:
    """Blocks fetched when each job (``size`` sites of ``order``, read in that order, in its own
    process) keeps the last ``capacity`` blocks it read, as GDAL's cache (``http.cache_mb``)
    does: what a job really fetches, against the once-per-job count that assumes a cache as
    large as the job's blocks."""
    from collections import OrderedDict

    fetched = 0
    for start in range(0, len(order), size):
        cache: OrderedDict = OrderedDict()
        for i in order[start:start + size]:
            for gsd, blocks in by_gsd.items():
                for asset in range(weight[gsd]):
                    for block in blocks[i]:
                        key = (gsd, asset, block)
                        if key in cache:
                            cache.move_to_end(key)
                            continue
                        fetched += 1
                        cache[key] = True
                        if len(cache) > capacity:
                            cache.popitem(last=False)
    return fetched


def main() -> int:
    from xstars import store
    from xstars.config import load_config
    from xstars.demo import control
    from xstars.manifest import Manifest
    from xstars.sensors import sensors_of
    from xstars.source_blocks import part_reads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", type=Path, default=Path("results/demo/catalog/manifest.parquet"))
    parser.add_argument("--world", default="demo")
    parser.add_argument("--overrides", default="{}", help="config overrides (JSON), e.g. build.read_threads")
    parser.add_argument("--group-sizes", type=int, nargs="*", metavar="SITES_PER_GROUP",
                        help="locality group sizes to run (default: the config's build.sites_per_group)")
    parser.add_argument("--france", type=int, nargs="*", metavar="SITES_PER_PART",
                        help="instead: the blocks the France build touches, by geometry, at these part sizes")
    parser.add_argument("--cache-mb", type=float, nargs="*",
                        help="with --france: GDAL cache sizes to simulate (default: the config's http.cache_mb)")
    args = parser.parse_args()
    if args.france is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        caches = args.cache_mb or [load_config(None, {})["http"]["cache_mb"]]
        result = france_blocks(args.france or [64, 256, 1024], caches) | {"date": date.today().isoformat()}
        print(json.dumps(result, indent=1))
        return 0
    config = load_config(None, {"world": args.world, "catalogs": {"geoplateforme": {"max_concurrent_jobs": 1}}}
                         | json.loads(args.overrides))
    demo = config["demo"]
    control.ensure_up(Path(demo["root"]), demo["host"], demo["port"], demo["stac_backend_port"])
    url = control.read_server_json(Path(demo["root"])).base_url
    manifest = Manifest(args.manifest)
    sensors = sensors_of(config)
    per_part = int(config["build"]["samples_per_shard"])
    started = time.perf_counter()

    # What each site reads (the build's windows), by sample; parts in store order.
    plans = [store.plan_part(manifest, config, k) for k in range(store.n_parts(manifest.n_sites, per_part))]
    reads_of: dict[int, list] = {}
    for plan in plans:
        kept = [k for k, rows in enumerate(plan.sites) if all(x.status == "ok" for x in rows.values())]
        for k, reads in zip(kept, part_reads(plan.sites, plan.items, sensors, config), strict=True):
            reads_of[plan.first + k] = reads
    store_order = [[reads_of[i] for i in range(plan.first, plan.last) if i in reads_of] for plan in plans]
    cells = manifest.site_cells()
    sizes = args.group_sizes or [int(config["build"]["sites_per_group"]) or per_part]
    grouped = {size: locality_groups(cells, size) for size in sizes}
    facts = file_facts({read.href: read.sensor for reads in reads_of.values() for read in reads}, config)
    ordered = minimum(store_order, facts)
    floor = ordered["overall_blocks_bytes"] + ordered["overall_header_bytes"]
    mb = 1e6

    def over(count: int) -> float:
        return round(count / floor, 2)

    # The build as the workflow runs it, every job in its own process; the server counts bytes.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.zarr"
        store.init_store(path, manifest, config)
        fetched, peaks = 0, []
        for k in range(len(plans)):  # build.sites_per_group = 0: each part reads its own sites
            control.reset_stats(url)
            peaks.append(run_job(PART, str(args.manifest), str(path), json.dumps(config), str(k), ""))
            fetched += control.get_stats(url)["file_bytes"]
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        reference = {f.relative_to(path): f.read_bytes() for f in path.rglob("*") if f.is_file() and "/c/" in str(f)}
        rows = [{"plan": f"parts in store order, {per_part} sites each", "jobs": len(plans),
                 "fetched_mb": round(fetched / mb, 2), "fetched_over_minimum": over(fetched),
                 "minimum_mb": round((ordered["blocks_bytes"] + ordered["header_bytes"]) / mb, 2),
                 "minimum_over_block_minimum": over(ordered["blocks_bytes"] + ordered["header_bytes"]),
                 "peak_mb_per_job": round(max(peaks))}]
        for size, groups in grouped.items():  # locality groups read, then the parts pack
            staging = Path(tmp) / f"staging-{size}"
            cfg = json.dumps(config | {"build": {**config["build"], "sites_per_group": size}})
            fetched, peaks = 0, []
            for g in range(len(groups)):
                control.reset_stats(url)
                peaks.append(run_job(GROUP, str(args.manifest), str(staging), cfg, str(g)))
                fetched += control.get_stats(url)["file_bytes"]
            packed = Path(tmp) / f"packed-{size}.zarr"
            store.init_store(packed, manifest, config)
            pack_peaks = [run_job(PART, str(args.manifest), str(packed), cfg, str(k), str(staging))
                          for k in range(len(plans))]
            same = all(packed.joinpath(name).read_bytes() == data for name, data in reference.items())
            local = minimum([[reads_of[i] for i in group if i in reads_of] for group in groups], facts)
            rows.append({"plan": f"locality groups of {size} sites, then the parts pack", "jobs": len(groups),
                         "fetched_mb": round(fetched / mb, 2), "fetched_over_minimum": over(fetched),
                         "minimum_mb": round((local["blocks_bytes"] + local["header_bytes"]) / mb, 2),
                         "minimum_over_block_minimum": over(local["blocks_bytes"] + local["header_bytes"]),
                         "peak_mb_per_job": round(max(peaks)), "peak_mb_per_packing_part": round(max(pack_peaks)),
                         "staged_mb": round(sum(p.stat().st_size for p in staging.rglob("*.npz")) / mb, 2),
                         "store_identical": same})
            shutil.rmtree(staging)

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "sites": manifest.n_sites, "sites_built": len(reads_of), "files": len(facts),
        "block_shapes": sorted({f"{f['block'][0]}x{f['block'][1]}" for f in facts.values()}),
        "stored_mb": round(stored / mb, 2),
        "block_aligned_minimum_mb": round(floor / mb, 2),
        "minimum_per_stored_byte": round(floor / stored, 2),
        "plans": rows,
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
