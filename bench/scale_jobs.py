"""The France-size data flow of issue 15, simulated: every job that needs no network, at France
size, each in its own process, today's code (a git worktree of ``--baseline-ref``) beside this one.

Synthetic inputs, as the catalog would produce them for all of France (``FRANCE`` of
bench_scale.py: 30,960 sites, 64 search shards, 64 sites per build part):

* items with real-size JSON: each STAC collection's item is the recorded Planetary Computer item
  of ``../shared/fixtures`` (Sentinel-2 about 20 KB, Landsat about 19 KB) under a new id, one per
  tile, season window and rank (``catalog.candidates_per_window``); WorldCover one per 3-degree
  tile; the WMS layer families one per site and campaign year, as ``catalog.wms_items`` makes them;
* realistic coverage: a site is a candidate of every item of the tiles that contain its
  footprint (Sentinel-2 tiles of 109.8 km every 100 km, so sites in the overlaps see two tiles;
  Landsat scenes of 185 km every 160 km; WorldCover tiles of 333 km), with seeded random cloud
  and no-data fractions over its footprint;
* the search shards' files in this layout (candidates Parquet, items stac-geoparquet); today's
  layout (JSON lines with the item JSON in every candidate) for the first ``--old-shards``
  shards only: at France size they would be some 30 GB;
* today's manifest (item JSON in every row, fallbacks' JSON in ``fallbacks_json``) written from
  this layout's manifest, row by row as today's ``write_manifest`` lays it out.

Jobs, each ``xstars`` command as the workflow runs it (or the first lines of a build part, up to
its first request), timed with its peak RSS (``wait4``): the manifest merge in one job (the slice
today's layout can merge), the items jobs (one per sensor) and the manifest job, store init, build part
planning and manifest read, finalize's bookkeeping (with synthetic part records), verify's pass.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from shapely.geometry import box, mapping

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "planetary-computer"

#: Tiling of each STAC collection over the sites' CRS (Lambert-93): (step, side) in metres.
TILINGS = {"sentinel-2-l2a": (100_000, 109_800), "landsat-c2-l2": (160_000, 185_000), "esa-worldcover": (333_000, 333_000)}

WORLDCOVER = {
    "type": "Feature", "stac_version": "1.0.0", "collection": "esa-worldcover",
    "stac_extensions": ["https://stac-extensions.github.io/projection/v1.0.0/schema.json",
                        "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
    "properties": {"datetime": None, "start_datetime": "2021-01-01T00:00:00Z", "end_datetime": "2021-12-31T23:59:59Z",
                   "esa_worldcover:product_version": "2.0.0", "instruments": ["c-sar", "msi"],
                   "mission": "sentinel-1, sentinel-2", "platform": "sentinel-1a, sentinel-1b, sentinel-2a, sentinel-2b",
                   "proj:epsg": 4326},
    "assets": {"map": {"href": "https://esacci.blob.core.windows.net/esa-worldcover/v200/2021/map/{tile}_Map.tif",
                       "proj:shape": [36000, 36000], "raster:bands": [{"data_type": "uint8", "nodata": 0,
                                                                       "spatial_resolution": 10}],
                       "roles": ["data"], "title": "Land Cover Classes",
                       "type": "image/tiff; application=geotiff; profile=cloud-optimized"}},
}


def templates() -> dict[str, dict]:
    """One recorded item per collection (the largest Planetary Computer one: real size)."""
    out = {"esa-worldcover": WORLDCOVER}
    for collection in ("sentinel-2-l2a", "landsat-c2-l2"):
        features = json.loads((FIXTURES / f"{collection}.items.json").read_text())["features"]
        pc = [f for f in features if f.get("collection") == collection and "planetarycomputer" in json.dumps(f["links"])]
        out[collection] = max(pc or features, key=lambda f: len(json.dumps(f)))
    return out


class World:
    """The synthetic items of France, made once each and cached by id."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        from xstars.catalog import season_windows
        from xstars.sensors import sensors_of

        self.config = config
        self.sensors = sensors_of(config)
        self.windows = season_windows(config["dates"])
        self.per_window = int(config["catalog"]["candidates_per_window"])
        self.templates = templates()
        self.cache: dict[str, dict] = {}
        self.rng = np.random.default_rng(15)
        from pyproj import Transformer
        from shapely.ops import transform

        to_wgs84 = Transformer.from_crs(config["sites"]["crs"], "EPSG:4326", always_xy=True).transform
        self.to_wgs84 = lambda geometry: transform(to_wgs84, geometry)

    def tiles(self, collection: str, bounds) -> list[str]:
        step, side = TILINGS[collection]
        x0, y0, x1, y1 = bounds
        out = []
        for i in range(int((x1 - side) // step), int(x0 // step) + 1):
            for j in range(int((y1 - side) // step), int(y0 // step) + 1):
                if i * step <= x0 and x1 <= i * step + side and j * step <= y0 and y1 <= j * step + side:
                    out.append(f"{i:03d}{j:03d}")
        return out

    def stac_item(self, collection: str, tile: str, window, rank: int) -> dict:
        key = f"{collection}:{tile}:{window.name if window else '-'}:{rank}"
        if key not in self.cache:
            item = copy.deepcopy(self.templates[collection])
            item.pop("links", None)
            stamp = window.start + (window.end - window.start) * (rank + 1) / (self.per_window + 2) if window else None
            item["id"] = (f"ESA_WorldCover_10m_2021_v200_{tile}" if window is None
                          else f"{collection}_{tile}_{stamp:%Y%m%dT%H%M%S}_{rank}")
            if stamp is not None:
                item["properties"]["datetime"] = f"{stamp:%Y-%m-%dT%H:%M:%S}Z"
            for asset in item["assets"].values():
                asset["href"] = asset["href"].replace("{tile}", tile)
            step, side = TILINGS[collection]
            i, j = int(tile[:3]), int(tile[3:])
            footprint = self.to_wgs84(box(i * step, j * step, i * step + side, j * step + side))
            item["geometry"], item["bbox"] = mapping(footprint), list(footprint.bounds)
            self.cache[key] = item
        return self.cache[key]

    def wms_item(self, sensor, site, year: int) -> dict:
        layers = {key: name for key, name in sensor.layer_names(year).items() if key in sensor.layers_needed()}
        first = next(iter(layers.values()))
        x0, y0, x1, y1 = site.bounds
        size = round((x1 - x0) / sensor.gsd_m)
        url = sensor.catalog_cfg["url"]
        return {"type": "Feature", "stac_version": "1.0.0", "collection": sensor.collection,
                "id": f"{first}_{site.site_id}", "bbox": [x0, y0, x1, y1],
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {"datetime": None, "start_datetime": f"{year}-01-01T00:00:00Z",
                               "end_datetime": f"{year}-12-31T23:59:59Z", "ign:campaign_year": year,
                               "proj:code": self.config["sites"]["crs"], "gsd": sensor.gsd_m},
                "assets": {key: {"href": f"{url}?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS={layer}&STYLES="
                                         f"&CRS=EPSG%3A2154&BBOX={x0},{y0},{x1},{y1}&WIDTH={size}&HEIGHT={size}"
                                         f"&FORMAT=image%2Fpng", "type": "image/png", "roles": ["data"],
                                 "ign:layer": layer, "ign:bands": sensor.layer_bands(key)}
                           for key, layer in layers.items()}}

    def site_items(self, site) -> list[tuple[str, dict, str, float]]:
        """(sensor, item, window, invalid fraction) of every candidate of ``site``."""
        out = []
        for name, sensor in self.sensors.items():
            if sensor.kind == "wms_layers":
                for year in sensor.cfg["years"]:
                    out.append((name, self.wms_item(sensor, site, year), str(year), 0.0))
                continue
            for tile in self.tiles(sensor.collection, site.bounds):
                if sensor.kind == "stac_labels":
                    out.append((name, self.stac_item(sensor.collection, tile, None, 0), "-", 0.0))
                    continue
                for window in self.windows:
                    for rank in range(self.per_window):
                        invalid = float(min(1.0, self.rng.beta(0.6, 2.0)))
                        out.append((name, self.stac_item(sensor.collection, tile, window, rank), window.name,
                                    round(invalid, 6)))
        return out


def write_inputs(config: Mapping[str, Any], folder: Path, old_shards: int) -> dict[str, Any]:
    """The sites, and every search shard's files (this layout; today's for the first shards)."""
    from xstars import items as stac_items
    from xstars.catalog import search_groups, searches_path, select_shard, shard_of
    from xstars.manifest import Candidate, CandidatesWriter, items_dir, write_items
    from xstars.sites import sample_sites, write_sites

    sites = sample_sites(config)
    write_sites(sites, folder / "sites.parquet", config["sites"]["crs"])
    world = World(config)
    n_shards = int(config["catalog"]["search_shards"])
    groups = search_groups(sites, config["catalog"]["search_cell_m"])
    counts = {"sites": len(sites), "candidates": 0, "old_shard_sites": [], "shard_selection_s": []}
    json_of: dict[str, str] = {}
    for shard in range(n_shards):
        path = folder / "search" / f"shard-{shard}.parquet"
        writer = CandidatesWriter(path)
        old = (folder / "old" / "search" / f"shard-{shard}.jsonl") if shard < old_shards else None
        old_lines = []
        items: dict[str, dict[str, dict]] = defaultdict(dict)
        searches = []
        for group in shard_of(groups, shard, n_shards):
            rows = []
            for site in group.sites:
                if old:
                    counts["old_shard_sites"].append(site.site_id)
                for name, item, window, invalid in world.site_items(site):
                    items[name].setdefault(item["id"], item)
                    row = Candidate(site_id=site.site_id, sensor=name, item_id=item["id"],
                                    collection=item["collection"], window=window,
                                    datetime=stac_items.item_datetime(item).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                    eo_cloud_cover=stac_items.cloud_cover(item), cloud_fraction=invalid,
                                    nodata_fraction=0.0, invalid_fraction=invalid)
                    rows.append(row)
                    if old:
                        if item["id"] not in json_of:
                            json_of[item["id"]] = json.dumps(item, sort_keys=True, separators=(",", ":"))
                        record = {k: getattr(row, k) for k in ("site_id", "sensor", "item_id", "collection", "window",
                                                                 "datetime", "eo_cloud_cover", "cloud_fraction",
                                                                 "nodata_fraction", "invalid_fraction")}
                        old_lines.append(json.dumps(record | {"item_json": json_of[item["id"]]}, sort_keys=True))
            writer.write(rows)
            counts["candidates"] += len(rows)
            searches += [{"collection": s.collection, "window": w.name, "group_id": group.group_id, "kept": 3,
                          "continuations": [], "body": {"collections": [s.collection], "bbox": list(group.bounds),
                                                        "datetime": f"{w.start:%Y-%m-%d}/{w.end:%Y-%m-%d}",
                                                        "limit": 100}}
                         for s in world.sensors.values() if s.kind == "stac_raster" for w in world.windows]
        for name in world.sensors:
            write_items(items[name].values(), items_dir(path) / f"{name}.parquet")
        searches_path(path).write_text(json.dumps(searches, sort_keys=True))
        writer.close()
        # The shard's own choice for its sites, as its search job ends (catalog.search_shard).
        selecting = time.perf_counter()
        select_shard(config, [site for group in shard_of(groups, shard, n_shards) for site in group.sites], path)
        counts["shard_selection_s"].append(round(time.perf_counter() - selecting, 3))
        if old:
            old.parent.mkdir(parents=True, exist_ok=True)
            old.write_text("\n".join(old_lines) + "\n")
            searches_path(old).write_text(json.dumps(searches, sort_keys=True))
        print(f"shard {shard + 1}/{n_shards}: {counts['candidates']} candidates", file=sys.stderr, flush=True)
    return counts


def write_old_manifest(manifest_path: Path, out: Path) -> None:
    """Today's manifest of the same rows: the chosen item's JSON in ``item_json`` and each
    fallback with its JSON in ``fallbacks_json`` (as today's ``catalog.select`` writes them)."""
    import rustac

    from xstars.manifest import Manifest

    manifest = Manifest(manifest_path)
    json_of = {}
    for sensor in manifest.layout["items"]:
        for item in rustac.read_sync(str(manifest.items_path(sensor)), set_self_link=False)["features"]:
            json_of[item["id"]] = json.dumps(item, sort_keys=True, separators=(",", ":"))
    source = manifest.file
    schema = None
    writer = None
    for group in range(source.num_row_groups):
        table = source.read_row_group(group)
        records = table.to_pylist()
        item_json = [json_of.get(r["item_id"], "") for r in records]
        fallbacks = [json.dumps([f | {"item_json": json_of[f["item_id"]]} for f in r["fallbacks"]], sort_keys=True)
                     for r in records]
        old = table.drop_columns(["fallbacks", "reason_code", "reason_sensor"])
        old = old.add_column(old.schema.get_field_index("assets") + 1, "item_json", pa.array(item_json, pa.string()))
        old = old.add_column(old.schema.get_field_index("item_json") + 1, "fallbacks_json",
                             pa.array(fallbacks, pa.string()))
        if writer is None:
            schema = old.schema.with_metadata({b"geo": source.schema_arrow.metadata[b"geo"],
                                               b"xstars": json.dumps(manifest.provenance).encode()})
            writer = pq.ParquetWriter(out, schema, compression="zstd")
        writer.write_table(old.cast(schema))
    writer.close()


def part_records(manifest_path: Path, folder: Path, config: Mapping[str, Any]) -> list[Path]:
    """One record per build part, as ``build part`` writes them (every site kept or dropped as
    the manifest says, with the parts' statistics sums), for finalize."""
    from xstars.manifest import Manifest
    from xstars.sensors import image_sensors
    from xstars.store import n_parts

    manifest = Manifest(manifest_path)
    per_shard = int(config["build"]["samples_per_shard"])
    bands = {name: len(s.bands) for name, s in image_sensors(config).items()}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in range(n_parts(manifest.n_sites, per_shard)):
        records = []
        for rows in manifest.part(part, per_shard):
            head = rows[0]
            records.append({"site_id": head.site_id, "split": head.split, "status": head.status, "reason": head.reason,
                            "reason_code": head.reason_code, "reason_sensor": head.reason_sensor,
                            "dropped_by": "catalog" if head.reason else "",
                            "items": {r.sensor: r.item_id for r in rows if head.status == "ok"},
                            "fallbacks_tried": {}, "shifts": {}})
        first = part * per_shard
        stats = {name: {"pixels": 1000, "sum": [500.0] * n, "sum_sq": [300.0] * n} for name, n in bands.items()}
        record = {"part": part, "first": first, "last": first + len(records), "records": records, "checksums": {},
                  "statistics": stats}
        path = folder / f"part-{part}.json"
        path.write_text(json.dumps(record, sort_keys=True))
        paths.append(path)
    return paths


# ================================================================================== the jobs

#: The first lines of a build part, up to its first request (``store.build_part``): today's
#: (the whole manifest read, then the part's rows) and this layout's (``store.plan_part``).
PART_HEAD = {
    "old": """
from xstars.catalog import read_manifest
from xstars.store import stored_sites
manifest = read_manifest(MANIFEST)
sites = stored_sites(manifest)
first, last = PART * PER_SHARD, min((PART + 1) * PER_SHARD, len(sites))
rows_of = {s: manifest[manifest.site_id == s].set_index("sensor") for s in sites[first:last]}
print(len(rows_of), sum(len(r) for r in rows_of.values()))
""",
    "new": """
from xstars.manifest import Manifest
from xstars.store import plan_part
plan = plan_part(Manifest(MANIFEST), CONFIG, PART)
print(len(plan.sites), sum(len(v) for v in plan.items.values()))
""",
    # With locality groups: a group job's plan (every site's cell, its sites' rows and items),
    # and a packing part's (its rows, which group staged each site).
    "group": """
from xstars.manifest import Manifest
from xstars.store import plan_group
plan = plan_group(Manifest(MANIFEST), CONFIG, PART)
print(len(plan.sites), sum(len(v) for v in plan.items.values()))
""",
    "pack": """
from xstars.manifest import Manifest
from xstars.staging import locality_groups
from xstars.store import plan_part
manifest = Manifest(MANIFEST)
plan = plan_part(manifest, CONFIG, PART, with_items=False)
groups = locality_groups(manifest.site_cells(), CONFIG["build"]["sites_per_group"])
print(len(plan.sites), len(groups))
""",
}


#: Starts the job and reports its peak RSS: a child's ``ru_maxrss`` starts at its parent's at
#: fork, so the job is started by this small process, not by the benchmark (hundreds of MB).
LAUNCHER = """
import json, os, subprocess, sys
process = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"peak_mb": round(usage.ru_maxrss / 1024), "exit": os.waitstatus_to_exitcode(status)}))
"""


def run_job(argv: list[str], code_root: Path, log: Path, ok_exits: tuple[int, ...] = (0,)) -> dict[str, float]:
    """Run one job in its own process with ``code_root``'s xstars; its wall time and peak RSS
    (a job ending with another status than ``ok_exits`` stops the benchmark)."""
    env = os.environ | {"PYTHONPATH": str(code_root)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, str(log), *argv], cwd=code_root, env=env,
                            capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    figures = json.loads(result.stdout)
    if figures["exit"] not in ok_exits:  # a job that failed has no figures worth a table
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise SystemExit(f"{' '.join(argv[:4])} ... in {code_root} failed (exit {figures['exit']}):\n{tail}")
    return {"seconds": round(wall, 2), **figures}


def config_for(code_root: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the keys ``code_root``'s schema does not know (keys added since the
    baseline; its validation refuses unknown keys)."""
    import yaml

    schema = yaml.safe_load((code_root / "xstars" / "schemas" / "config.schema.yaml").read_text())

    def resolve(node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def applying(node: Any, value: dict) -> dict:
        """The node with the ``allOf`` ``if``/``then`` branches that hold for ``value`` folded in."""
        node = dict(resolve(node))
        for branch in node.pop("allOf", []):
            condition = branch.get("if", {}).get("properties", {})
            if all(value.get(key) == rule.get("const") for key, rule in condition.items()):
                chosen = applying(branch.get("then", branch), value)
                node["properties"] = {**node.get("properties", {}), **chosen.get("properties", {})}
                if "additionalProperties" in chosen:
                    node["additionalProperties"] = chosen["additionalProperties"]
        return node

    def prune(value: Any, node: Any) -> Any:
        if not isinstance(value, dict) or not isinstance(resolve(node), dict):
            return value
        node = applying(node, value)
        properties, extra = node.get("properties", {}), node.get("additionalProperties", True)
        return {key: prune(item, properties[key]) if key in properties else prune(item, extra)
                for key, item in value.items() if key in properties or extra is not False}

    return prune(dict(config), schema)


def xstars(*args: str) -> list[str]:
    return [sys.executable, "-m", "xstars", *args]


def part_head(flavour: str, manifest: Path, config: Mapping[str, Any], part: int) -> list[str]:
    code = (f"import json\nMANIFEST = {str(manifest)!r}\nCONFIG = json.loads({json.dumps(json.dumps(config))})\n"
            f"PART = {part}\nPER_SHARD = {config['build']['samples_per_shard']}\n" + PART_HEAD[flavour])
    return [sys.executable, "-c", code]


def baseline_worktree(ref: str, folder: Path) -> Path:
    """Today's code: a detached git worktree of ``ref`` (removed by :func:`drop_worktree`)."""
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(folder), ref], cwd=REPO, check=True,
                   capture_output=True)
    return folder


def drop_worktree(folder: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=REPO, check=False, capture_output=True)


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


def simulate(config: dict, folder: Path, baseline_ref: str, old_shards: int) -> dict[str, Any]:
    """Every job, today's and this layout's; the table's rows."""
    from xstars.sites import read_sites, write_sites
    from xstars.staging import n_groups
    from xstars.store import n_parts

    folder.mkdir(parents=True, exist_ok=True)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    started = time.perf_counter()
    counts = write_inputs(config, folder, old_shards)
    counts["inputs_s"] = round(time.perf_counter() - started, 1)
    cfg = json.dumps(config)
    new_dir, old_dir = folder / "new", folder / "old"
    new_dir.mkdir(exist_ok=True)
    shards = sorted((folder / "search").glob("shard-*[0-9].parquet"),
                    key=lambda p: int(p.stem.split("-")[1]))
    # A slice of France both layouts can merge: the sites of the first shards (today's
    # candidates of all of France would be some 30 GB of JSON lines).
    keep = set(counts["old_shard_sites"])
    write_sites([s for s in read_sites(folder / "sites.parquet") if s.site_id in keep], folder / "sites-slice.parquet",
                config["sites"]["crs"])
    old_root = baseline_worktree(baseline_ref, folder / "baseline")
    rows: dict[str, dict[str, Any]] = {}
    try:
        rows[f"manifest merge in one job, {old_shards} of {len(shards)} shards ({len(keep)} sites)"] = {
            "today": run_job(xstars("catalog", "manifest", "--config-json", json.dumps(config_for(old_root, config)),
                                    "--sites",
                                    str(folder / "sites-slice.parquet"), "--out", str(old_dir / "slice.parquet"),
                                    *map(str, sorted((old_dir / "search").glob("*.jsonl")))), old_root,
                             logs / "old-merge.log"),
            "after": run_job(xstars("catalog", "manifest", "--config-json", cfg, "--sites",
                                    str(folder / "sites-slice.parquet"), "--out", str(new_dir / "slice.parquet"),
                                    *map(str, shards[:old_shards])), REPO, logs / "new-merge-slice.log")}
        # All of France as the workflow runs it: an items job per sensor, then the manifest job.
        for sensor in config["sensors"]:
            rows[f"manifest items, {sensor}, all {len(shards)} shards"] = {
                "today": None,
                "after": run_job(xstars("catalog", "items", "--config-json", cfg, "--sensor", sensor, "--out",
                                        str(new_dir / "items" / f"{sensor}.parquet"), *map(str, shards)), REPO,
                                 logs / f"new-items-{sensor}.log")}
        rows[f"manifest rows, all {len(shards)} shards ({counts['sites']} sites)"] = {
            "today": None,
            "after": run_job(xstars("catalog", "manifest", "--config-json", cfg, "--sites", str(folder / "sites.parquet"),
                                    "--items", str(new_dir / "items"), "--out", str(new_dir / "manifest.parquet"),
                                    *map(str, shards)), REPO, logs / "new-merge.log")}
        write_old_manifest(new_dir / "manifest.parquet", old_dir / "manifest.parquet")
        parts = part_records(new_dir / "manifest.parquet", folder / "parts", config)
        part = n_parts(counts["sites"], config["build"]["samples_per_shard"]) // 2
        jobs = {
            "store init": lambda m, s, c: xstars("build", "init", "--config-json", c, "--manifest", str(m), "--store",
                                                 str(s), "--out", str(s.parent / "init.json")),
            f"build part {part}: plan and manifest read": None,
            "finalize (bookkeeping)": lambda m, s, c: xstars("build", "finalize", "--config-json", c, "--manifest",
                                                             str(m), "--store", str(s), "--out",
                                                             str(s.parent / "summary.json"), *map(str, parts)),
            "verify (manifest pass)": lambda m, s, c: xstars("build", "verify", "--manifest", str(m), "--store",
                                                             str(s), "--out", str(s.parent / "verify.json")),
        }
        for name, argv in jobs.items():
            row = {}
            for flavour, root, work in (("today", old_root, old_dir), ("after", REPO, new_dir)):
                manifest, store_path = work / "manifest.parquet", work / "dataset.zarr"
                command = (part_head("old" if flavour == "today" else "new", manifest, config_for(root, config), part)
                           if argv is None else argv(manifest, store_path, json.dumps(config_for(root, config))))
                # verify finds the pixels unbuilt (exit 2, as it should): its manifest pass is what is timed
                row[flavour] = run_job(command, root, logs / f"{flavour}-{name.split()[0]}.log",
                                       ok_exits=(0, 2) if name.startswith("verify") else (0,))
            rows[name] = row
        # With locality groups (build.sites_per_group): a group job and a packing part, this layout only.
        group = n_groups(counts["sites"], config["build"]["sites_per_group"]) // 2
        for name, flavour, index in ((f"build group {group}: plan and manifest read", "group", group),
                                     (f"build part {part}, packing: plan and manifest read", "pack", part)):
            rows[name] = {"today": None, "after": run_job(part_head(flavour, new_dir / "manifest.parquet", config, index),
                                                          REPO, logs / f"after-{flavour}.log")}
    finally:
        drop_worktree(old_root)
    sizes = {"today: manifest.parquet": size_mb(old_dir / "manifest.parquet"),
             "after: manifest.parquet": size_mb(new_dir / "manifest.parquet"),
             "after: manifest.items/": size_mb(new_dir / "manifest.items"),
             "after: the items jobs' files (copied into manifest.items/)": size_mb(new_dir / "items"),
             "after: search shards (candidates + items)": size_mb(folder / "search"),
             f"today: {old_shards} search shards (JSON lines)": size_mb(old_dir / "search")}
    return {"inputs": counts | {"old_shard_sites": len(keep)}, "jobs": rows, "disk_mb": sizes,
            "peak_rss_of_this_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
