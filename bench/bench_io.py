"""What the build really fetches from the COGs, against the block-aligned minimum (issue 14).

On the demo world served on loopback and its manifest, in one run:

* **fetched**: every build part run as the workflow runs it (its own process, so GDAL's caches
  start empty), the bytes the demo's file server sent during it (its counter);
* **minimum, parts in store order**: the blocks each part's sites touch
  (:mod:`xstars.source_blocks`, the build's own windows), each counted once per part, with the
  files' real block sizes (compressed bytes, from their headers); plus one header per file per
  part: what a part must fetch at least;
* **minimum, parts by locality**: the same with the sites cut into parts of the same size along
  a Z-order curve of their footprints (sites that share blocks in the same part);
* **block-aligned minimum**: every block any site touches, once for the whole build.

Per stored byte: the store's bytes on disk. Ratios are against the block-aligned minimum::

    .venv/bin/xstars demo up --world demo
    .venv/bin/python bench/bench_io.py --manifest results/demo/catalog/manifest.parquet
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

PART = r"""
import json, sys
from pathlib import Path
from xstars import store
from xstars.manifest import Manifest
manifest_path, store_path, config_json, part = sys.argv[1:5]
store.build_part(Path(store_path), Manifest(Path(manifest_path)), json.loads(config_json), int(part))
"""


def z_order(x: int, y: int) -> int:
    z = 0
    for bit in range(24):
        z |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    return z


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
        signed = sign_href(href, sensors[sensor].catalog_cfg["signing"], http_cfg=config["http"], what=href)
        with rasterio.Env(**gdal_options(config["http"])), rasterio.open(signed) as src:
            opened = control.get_stats(url)["file_bytes"]
            height, width = src.block_shapes[0]
            n_rows, n_cols = -(-src.height // height), -(-src.width // width)
            sizes = {(r, c): src.block_size(1, r, c) for r in range(n_rows) for c in range(n_cols)}
        facts[href] = {"block": (height, width), "sizes": sizes, "header_bytes": opened}
    return facts


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
    args = parser.parse_args()
    config = load_config(None, {"world": args.world, "catalogs": {"geoplateforme": {"max_concurrent_jobs": 1}}}
                         | json.loads(args.overrides))
    demo = config["demo"]
    control.ensure_up(Path(demo["root"]), demo["host"], demo["port"], demo["stac_backend_port"])
    url = control.read_server_json(Path(demo["root"])).base_url
    manifest = Manifest(args.manifest)
    sensors = sensors_of(config)
    per_part = int(config["build"]["samples_per_shard"])
    started = time.perf_counter()

    # What each part reads, site by site, in store order.
    plans = [store.plan_part(manifest, config, k) for k in range(store.n_parts(manifest.n_sites, per_part))]
    store_order = [part_reads(plan.sites, plan.items, sensors, config) for plan in plans]
    # The same sites cut along a Z-order curve of their footprints' cells.
    kept = [(next(iter(rows.values())), reads) for plan, sites in zip(plans, store_order, strict=True)
            for rows, reads in zip([r for r in plan.sites if all(x.status == "ok" for x in r.values())], sites,
                                   strict=True)]
    col0, row0 = min(row.col for row, _ in kept), min(row.row for row, _ in kept)
    kept.sort(key=lambda pair: (z_order(pair[0].col - col0, pair[0].row - row0), pair[0].site_id))
    locality = [[reads for _, reads in kept[i:i + per_part]] for i in range(0, len(kept), per_part)]

    facts = file_facts({read.href: read.sensor for sites in store_order for reads in sites for read in reads}, config)

    # The build, part by part, each in its own process; the server counts what it sends.
    fetched, stored = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.zarr"
        store.init_store(path, manifest, config)
        for k in range(len(plans)):
            control.reset_stats(url)
            subprocess.run([sys.executable, "-c", PART, str(args.manifest), str(path), json.dumps(config), str(k)],
                           check=True, capture_output=True, text=True)
            fetched += control.get_stats(url)["file_bytes"]
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    ordered, local = minimum(store_order, facts), minimum(locality, facts)
    floor = ordered["overall_blocks_bytes"] + ordered["overall_header_bytes"]
    mb = 1e6
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "sites_built": len(kept), "parts": len(plans), "files": len(facts),
        "block_shapes": sorted({f"{f['block'][0]}x{f['block'][1]}" for f in facts.values()}),
        "stored_mb": round(stored / mb, 2),
        "fetched_mb": round(fetched / mb, 2),
        "minimum_store_order_mb": round((ordered["blocks_bytes"] + ordered["header_bytes"]) / mb, 2),
        "minimum_locality_order_mb": round((local["blocks_bytes"] + local["header_bytes"]) / mb, 2),
        "block_aligned_minimum_mb": round(floor / mb, 2),
        "fetched_over_minimum": round(fetched / floor, 2),
        "store_order_over_minimum": round((ordered["blocks_bytes"] + ordered["header_bytes"]) / floor, 2),
        "locality_order_over_minimum": round((local["blocks_bytes"] + local["header_bytes"]) / floor, 2),
        "fetched_per_stored_byte": round(fetched / stored, 2),
        "minimum_per_stored_byte": round(floor / stored, 2),
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
