"""Catalog: from sites to a manifest that pins exactly which scene every tile is made of.

The stage runs in three steps, each a Snakemake rule (``workflow/rules/catalog.smk``):

1. :func:`xstars.sites.sample_sites` draws the sites (``sites.parquet``).
2. :func:`search_shard`, in parallel shards: sites are grouped into square search cells
   (:func:`search_groups`); for each group, sensor and season window one small STAC search
   (:class:`xstars.stac_search.StacSearcher`), so the number of requests grows with groups, not sites x scenes.
   The least cloudy scenes of each search have their quality mask read over the group's
   footprints (:func:`footprint_fractions`): a scene is judged by the clouds *over the site*,
   not only by its scene-level ``eo:cloud_cover``. IGN orthophotos, which have no catalogue,
   are described as STAC-like items from the WMS capabilities (:func:`wms_items`), one per
   site and campaign year, with a GetMap request as asset. Output: one candidate row per site,
   sensor and scene.
   Each shard writes its candidates and, once each, the items they name (:func:`search_shard`),
   then ranks its own sites' candidates (:func:`select_shard`; the rule:
   :func:`xstars.selection.select_site`, applied to all of them at once by
   :class:`xstars.selection.TableSelection`): one row per site and sensor with the chosen item
   and its fallbacks by id, the footprint, the date, the cloud figures, and the reason a site
   was dropped if it was.
3. :func:`merge_manifest` puts the shards' rows in site order as the manifest
   (:mod:`xstars.manifest`) and merges the items they name, once each beside it, as
   stac-geoparquet.

A manifest given as ``catalog.manifest`` (frozen mode) replaces steps 1-3: no search at all.

The searches themselves, made robust against the real services, are :mod:`xstars.stac_search`;
the choice of a scene per site and sensor is :mod:`xstars.selection`; the manifest's files are
:mod:`xstars.manifest`. Sentinel-2 reprocessed duplicates are resolved to the highest
processing baseline (:func:`xstars.items.dedupe_s2_reprocessed`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from shapely.geometry import box, mapping, shape

from xstars import items as stac_items
from xstars.errors import ConfigError, DataError
from xstars.manifest import (
    MOSAIC_KEY,
    ROW_SCHEMA,
    Candidate,
    CandidatesWriter,
    Manifest,
    ManifestRow,
    ManifestWriter,
    candidates_table,
    file_sha256,
    items_dir,
    merge_items,
    referenced_ids,
    write_items,
)
from xstars.remote import (
    Grid,
    WmsClient,
    WmsLayer,
    check_wms_sensor,
    read_on_grid,
)
from xstars.selection import Choosing, TableSelection, rows_summary
from xstars.sensors import Sensor, sensors_of
from xstars.sites import Site, reproject_geometry
from xstars.stac_search import SearchLog, StacSearcher

log = logging.getLogger(__name__)


# ======================================================================== windows and groups


@dataclass(frozen=True)
class SearchWindow:
    """A date window searched at once: one season of one year (``2022-summer``)."""

    name: str
    start: datetime
    end: datetime

    @property
    def interval(self) -> str:
        """RFC 3339 interval with full timestamps (date-only intervals are refused by some APIs)."""
        return f"{stac_items.iso_time(self.start)}/{stac_items.iso_time(self.end)}"

    @property
    def middle(self) -> datetime:
        return self.start + (self.end - self.start) / 2


def season_windows(dates_cfg: Mapping[str, Any]) -> list[SearchWindow]:
    """One window per year and season between ``dates.start`` and ``dates.end`` (inclusive).

    A season's months are cut into runs of consecutive months within the year (a winter of
    December, January and February gives two windows), each clipped to the date range.
    Raises ConfigError naming ``dates`` when no day of any season falls in the range.
    """
    first, last = date.fromisoformat(dates_cfg["start"]), date.fromisoformat(dates_cfg["end"])
    windows = []
    for year in range(first.year, last.year + 1):
        for season in dates_cfg["seasons"]:
            for run in _month_runs(sorted(season["months"])):
                start = max(date(year, run[0], 1), first)
                end = min(_last_day(year, run[-1]), last)
                if start > end:
                    continue
                suffix = "" if len(_month_runs(sorted(season["months"]))) == 1 else f"-{run[0]:02d}"
                windows.append(SearchWindow(
                    f"{year}-{season['name']}{suffix}",
                    datetime(start.year, start.month, start.day, tzinfo=UTC),
                    datetime(end.year, end.month, end.day, 23, 59, 59, tzinfo=UTC),
                ))
    if not windows:
        raise ConfigError(
            f"dates: no day of any season ({', '.join(s['name'] for s in dates_cfg['seasons'])}) falls "
            f"between start {dates_cfg['start']} and end {dates_cfg['end']}: the date window is empty"
        )
    return sorted(windows, key=lambda w: w.start)


def _month_runs(months: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for month in months:
        if runs and runs[-1][-1] == month - 1:
            runs[-1].append(month)
        else:
            runs.append([month])
    return runs


def _last_day(year: int, month: int) -> date:
    return (date(year + month // 12, month % 12 + 1, 1)) - timedelta(days=1)


@dataclass(frozen=True)
class SearchGroup:
    """Sites searched together: those whose footprint centre falls in one square search cell."""

    group_id: str
    sites: tuple[Site, ...]
    cell: tuple[int, int] = (0, 0)  # the search cell's column and row

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Union of the sites' footprints (sites CRS)."""
        boxes = np.array([s.bounds for s in self.sites])
        return (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())


def search_groups(sites: Iterable[Site], cell_m: float) -> list[SearchGroup]:
    """Group sites by search cell, sorted by group id (stable across runs)."""
    cells: dict[tuple[int, int], list[Site]] = defaultdict(list)
    for site in sites:
        xmin, ymin, xmax, ymax = site.bounds
        cells[(math.floor((xmin + xmax) / 2 / cell_m), math.floor((ymin + ymax) / 2 / cell_m))].append(site)
    groups = [SearchGroup(f"g{cx}_{cy}", tuple(sorted(members, key=lambda s: s.site_id)), (cx, cy))
              for (cx, cy), members in cells.items()]
    return sorted(groups, key=lambda g: g.group_id)


def shard_of(groups: Sequence[SearchGroup], shard: int, n_shards: int) -> list[SearchGroup]:
    """The groups of one search shard: the groups along a Z-order curve of their cells, cut into
    ``n_shards`` runs of about as many sites each.

    A run of a Z-order curve is a compact patch of the map, so a shard searches the scenes of a
    few tiles and stores few items, and the manifest job merges few copies of each (dealt round
    robin, every shard of the France build searched nearly every Sentinel-2 tile)."""
    if not 0 <= shard < n_shards:
        raise ConfigError(f"search shard {shard} is not in 0..{n_shards - 1} (catalog.search_shards)")
    ordered = sorted(groups, key=lambda g: (z_order(*g.cell), g.group_id))
    sizes = np.cumsum([len(g.sites) for g in ordered])
    if not len(ordered):
        return []
    # A group goes to the shard its first site falls in, counting sites along the curve.
    first_site = np.r_[0, sizes[:-1]]
    owner = (first_site * n_shards) // int(sizes[-1])
    return [g for g, k in zip(ordered, owner, strict=True) if k == shard]


def z_order(col: int, row: int) -> int:
    """Position of a cell on the Z-order (Morton) curve: the bits of column and row interleaved
    (offset so that cells of negative index order too)."""
    x, y, z = col + (1 << 20), row + (1 << 20), 0
    for bit in range(21):
        z |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    return z


def to_wgs84(geometry, crs: str):
    """A shapely geometry in ``crs`` -> WGS84 (lon, lat)."""
    return reproject_geometry(geometry, crs, "EPSG:4326")


# ======================================================================= footprint fractions


def footprint_fractions(item: Mapping[str, Any], sensor: Sensor, sites: Sequence[Site], sites_crs: str,
                        http_cfg: Mapping[str, Any]) -> dict[str, dict]:
    """Cloud and no-data fractions of each site's footprint in the item's quality mask.

    The mask asset is read once over the union of the sites' footprints, resampled (nearest)
    onto a grid of the mask's own resolution in the sites CRS. ``nodata`` counts pixels outside
    the scene or flagged as fill; ``cloud`` the other invalid pixels (cloud, shadow, cirrus...).
    """
    asset_key = sensor.asset_key(sensor.mask_band)
    asset = item["assets"].get(asset_key)
    if asset is None:
        raise DataError(f"item {item['id']!r} has no asset {asset_key!r} (sensors.{sensor.name}.mask)")
    gsd = stac_items.asset_gsd_m(item, asset) or sensor.gsd_m
    boxes = np.array([s.bounds for s in sites])
    union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
    # Snap outwards to the mask's resolution so every footprint is whole pixels of the grid.
    snapped = (math.floor(union[0] / gsd) * gsd, math.floor(union[1] / gsd) * gsd,
               math.ceil(union[2] / gsd) * gsd, math.ceil(union[3] / gsd) * gsd)
    grid = Grid.from_bounds(snapped, gsd, sites_crs)
    data, covered = read_on_grid(asset["href"], grid, catalog_cfg=sensor.catalog_cfg, http_cfg=http_cfg,
                                 what=f"{sensor.collection}/{item['id']}/{asset_key}", indexes=[1])
    mask = data[0]
    invalid = sensor.invalid_from_mask(mask)
    fill = ~covered | sensor.fill_from_mask(mask)
    out = {}
    for site in sites:
        rows, cols = _pixel_window(grid, site.bounds)
        site_fill = fill[rows, cols]
        site_invalid = invalid[rows, cols] | site_fill
        total = site_fill.size
        out[site.site_id] = {
            "nodata_fraction": round(float(site_fill.sum()) / total, 6),
            "cloud_fraction": round(float((site_invalid & ~site_fill).sum()) / total, 6),
            "invalid_fraction": round(float(site_invalid.sum()) / total, 6),
        }
    return out


def _pixel_window(grid: Grid, bounds: Sequence[float]) -> tuple[slice, slice]:
    """Pixels whose centre lies in ``bounds`` (footprints need not align with a coarse grid)."""
    t = grid.transform
    col0 = math.ceil((bounds[0] - t.c) / t.a - 0.5)
    col1 = math.ceil((bounds[2] - t.c) / t.a - 0.5)
    row0 = math.ceil((bounds[3] - t.f) / t.e - 0.5)
    row1 = math.ceil((bounds[1] - t.f) / t.e - 0.5)
    return slice(row0, row1), slice(col0, col1)


def footprint_coverage(item: Mapping[str, Any], site: Site, sites_crs: str) -> float:
    """Fraction of the site's footprint inside the item's geometry (1.0: fully covered)."""
    footprint = box(*site.bounds)
    geometry = reproject_geometry(shape(item["geometry"]), "EPSG:4326", sites_crs)
    return round(float(geometry.intersection(footprint).area / footprint.area), 6)


# ==================================================================================== IGN WMS


def wms_items(sensor: Sensor, site: Site, sites_crs: str, layers: Mapping[str, WmsLayer],
              client: WmsClient) -> list[tuple[dict, float]]:
    """STAC-like items of a WMS layer family covering a site, with their no-data fraction.

    One item per year of ``sensors.<name>.years`` whose layers (those the sensor's bands come
    from) all exist and whose geographic boxes (``EX_GeographicBoundingBox``: the real layers
    declare no Lambert-93 one) contain the footprint. ``datetime`` is null and
    ``start_datetime``/``end_datetime`` span the campaign year; the assets are the exact GetMap
    requests for the footprint at the sensor's ``gsd_m``. The no-data fraction is measured on
    a thumbnail: transparent or fill-coloured pixels (:meth:`Sensor.empty_pixels`).
    """
    footprint = box(*site.bounds)
    geometry = to_wgs84(footprint, sites_crs)
    size = round((site.bounds[2] - site.bounds[0]) / sensor.gsd_m)
    out = []
    for year in sensor.cfg["years"]:
        names = sensor.layer_names(year)
        wanted = {key: names[key] for key in sensor.layers_needed()}
        if not all(n in layers for n in wanted.values()):
            continue
        if not all(layers[n].bounds_wgs84 is None or box(*layers[n].bounds_wgs84).contains(geometry)
                   for n in wanted.values()):
            continue
        nodata = round(max(float(sensor.empty_pixels(client.thumbnail(n, site.bounds), key).mean())
                           for key, n in wanted.items()), 6)
        first = next(iter(wanted.values()))
        item = {
            "type": "Feature", "stac_version": "1.0.0", "collection": sensor.collection,
            "id": f"{first}_{site.site_id}",
            "bbox": [round(v, 7) for v in geometry.bounds],
            "geometry": mapping(geometry),
            "properties": {
                "datetime": None,
                "start_datetime": f"{year}-01-01T00:00:00Z",
                "end_datetime": f"{year}-12-31T23:59:59Z",
                "ign:campaign_year": year,
                "proj:code": sites_crs,
                "gsd": sensor.gsd_m,
            },
            "assets": {
                key: {"href": client.getmap_url(layer, site.bounds, size, size), "type": client.cfg["format"],
                      "roles": ["data"], "ign:layer": layer, "ign:bands": sensor.layer_bands(key)}
                for key, layer in wanted.items()
            },
        }
        out.append((item, nodata))
    return out


# ============================================================================ search shards


class Services:
    """The clients of one search job: a searcher per STAC catalogue and a client per WMS (with its
    layers, read once from GetCapabilities), opened when a sensor first needs them; and the items
    the job's candidates name, kept once each (unsigned) for the shard's items files."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.searchers: dict[str, StacSearcher] = {}
        self.wms: dict[str, tuple[WmsClient, dict[str, WmsLayer]]] = {}
        self.items: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)

    def searcher(self, sensor: Sensor) -> StacSearcher:
        if sensor.catalog_name not in self.searchers:
            self.searchers[sensor.catalog_name] = StacSearcher(sensor.catalog_cfg, self.config["http"],
                                                               sensor.catalog_name)
        return self.searchers[sensor.catalog_name]

    def wms_client(self, sensor: Sensor) -> tuple[WmsClient, dict[str, WmsLayer]]:
        if sensor.catalog_name not in self.wms:
            client = WmsClient(sensor.catalog_cfg, self.config["http"])
            self.wms[sensor.catalog_name] = (client, client.layers())
        return self.wms[sensor.catalog_name]

    def search_log(self) -> list[dict]:
        return [vars(entry) for searcher in self.searchers.values() for entry in searcher.logs]

    def candidate(self, site: Site, sensor: Sensor, item: Mapping[str, Any], window: str,
                  fractions: Mapping[str, float], rank_last: bool = False) -> Candidate:
        """The candidate row of ``item`` for ``site``; the item itself is kept once, by id."""
        if item["id"] not in self.items[sensor.name]:
            self.items[sensor.name][item["id"]] = stac_items.unsigned(item)
        return Candidate(site_id=site.site_id, sensor=sensor.name, item_id=item["id"],
                         collection=item.get("collection", ""), window=window,
                         datetime=stac_items.iso_time(stac_items.item_datetime(item)), eo_cloud_cover=stac_items.cloud_cover(item),
                         **{key: float(fractions[key]) for key in ("cloud_fraction", "nodata_fraction",
                                                                   "invalid_fraction")},
                         rank_last=rank_last)


@dataclass(frozen=True)
class ShardOutput:
    """What a search shard wrote: its candidates file (items and search log beside it)."""

    path: Path
    candidates: int
    items: dict[str, int]
    searches: list[dict]


def search_shard(config: Mapping[str, Any], sites: Sequence[Site], shard: int, out: Path) -> ShardOutput:
    """Search one shard of groups; write its candidates to ``out`` (one row group per search
    group, as it goes), its items to ``<out>.items/<sensor>.parquet`` and its search log.

    Only one group's candidates are held at a time; the items they name are held once each.
    Each sensor is searched as its kind says (:data:`CANDIDATES`), in its own catalogue.
    """
    cat = config["catalog"]
    groups = shard_of(search_groups(sites, cat["search_cell_m"]), shard, cat["search_shards"])
    sensors = sensors_of(config)
    services = Services(config)
    if groups:
        for sensor in sensors.values():  # the configured layers first: one GetCapabilities answers for all
            if sensor.kind == "wms_layers":
                check_wms_sensor(sensor, services.wms_client(sensor)[0].capabilities())
        for sensor in sensors.values():
            if sensor.kind != "wms_layers":
                services.searcher(sensor).check_collection(sensor.collection, f"sensors.{sensor.name}.collection")
    writer = CandidatesWriter(out)
    started = time.perf_counter()
    for number, group in enumerate(groups, 1):
        rows: list[Candidate] = []
        for sensor in sensors.values():
            rows += CANDIDATES[sensor.kind](sensor, group, services)
        writer.write(rows)
        log.info("search shard=%d group %d/%d %s sites=%d candidates=%d elapsed=%.1fs", shard, number,
                 len(groups), group.group_id, len(group.sites), writer.count, time.perf_counter() - started)
    target = items_dir(out)
    if target.exists():
        shutil.rmtree(target)
    pins = {name: write_items(services.items[name].values(), target / f"{name}.parquet") for name in sensors}
    searches = services.search_log()
    searches_path(out).write_text(json.dumps(searches, indent=1, sort_keys=True) + "\n")
    writer.close()
    select_shard(config, [site for group in groups for site in group.sites], out)
    return ShardOutput(Path(out), writer.count, {name: pin["items"] for name, pin in pins.items() if pin}, searches)


def select_shard(config: Mapping[str, Any], sites: Sequence[Site], candidates_path: Path) -> Path:
    """The manifest rows of a shard's sites, chosen from its candidates (the selection rule,
    :class:`xstars.selection.TableSelection`), written sorted by site id beside them
    (:func:`rows_path`).

    A site's candidates all come from the one shard that searched its group, so the choice is
    made where they are, in parallel, and the manifest job only puts the shards' rows in order:
    at France size it would otherwise rank 2.3 million candidates itself."""
    ordered = sorted(sites, key=lambda s: s.site_id)
    choice = TableSelection(candidates_table([candidates_path]), ordered,
                            Choosing.of(sensors_of(config), config["catalog"]), config["catalog"])
    path = rows_path(candidates_path)
    tmp = path.with_suffix(".tmp")
    pq.write_table(choice.table_of(0, len(ordered)), tmp, compression="zstd")
    tmp.replace(path)
    return path


def searches_path(candidates_path: Path) -> Path:
    """A search shard's log of searches, beside its candidates."""
    return Path(candidates_path).with_name(Path(candidates_path).stem + ".searches.json")


def rows_path(candidates_path: Path) -> Path:
    """A search shard's manifest rows (:func:`select_shard`), beside its candidates."""
    return Path(candidates_path).with_name(Path(candidates_path).stem + ".rows.parquet")


def raster_candidates(sensor: Sensor, group: SearchGroup, services: Services) -> list[Candidate]:
    """A STAC collection of scenes: one search per season window; the least cloudy scenes of
    each have their quality mask read over the footprints they cover."""
    config = services.config
    sites_crs = config["sites"]["crs"]
    per_window = config["catalog"]["candidates_per_window"]
    bbox = to_wgs84(box(*group.bounds), sites_crs).bounds
    rows = []
    for window in season_windows(config["dates"]):
        found = services.searcher(sensor).search(
            sensor.collection, bbox, window, group_id=group.group_id,
            max_cloud_cover=sensor.cfg["max_scene_cloud_cover"], platforms=sensor.cfg.get("platforms"))
        if sensor.cfg["dedupe_reprocessed"]:
            found = stac_items.dedupe_s2_reprocessed(found)
        found = [item for item in found if _usable(sensor, item, services.searcher(sensor).logs[-1])]
        # Items an item rule ranks last come after every other (Landsat Tier 2), then the clearest.
        found.sort(key=lambda i: (sensor.item_rule(i) == "rank_last", stac_items.cloud_cover(i) or 0.0, i["id"]))
        for item in found[:per_window]:
            covering = [s for s in group.sites if footprint_coverage(item, s, sites_crs) > 0]
            if not covering:
                continue
            fractions = footprint_fractions(item, sensor, covering, sites_crs, config["http"])
            for site in covering:
                rows.append(services.candidate(site, sensor, item, window.name, fractions[site.site_id],
                                               rank_last=sensor.item_rule(item) == "rank_last"))
    return rows


def _usable(sensor: Sensor, item: Mapping[str, Any], entry: SearchLog) -> bool:
    """Whether a found item can be a candidate: not excluded by an item rule, and serving every
    asset the sensor reads. An item that is not is logged and recorded with why (a search
    shard does not die of one odd item)."""
    missing = [key for key in sensor.assets() if key not in item["assets"]]
    why = (f"no asset {', '.join(missing)} (sensors.{sensor.name})" if missing
           else f"excluded by sensors.{sensor.name}.item_rules" if sensor.item_rule(item) == "exclude"
           else "")
    if why:
        log.warning("item %s skipped: %s", item["id"], why)
        entry.skipped.append(f"{item['id']}: {why}")
    return not why


def label_candidates(sensor: Sensor, group: SearchGroup, services: Services) -> list[Candidate]:
    """A STAC collection of class maps: every item over the group, no date window; a site's
    no-data fraction is the share of its footprint outside the item. A footprint that no single
    item covers (on the edge of ESA WorldCover's 3-degree tiles) also gets the mosaic of the
    items that cover it (:func:`mosaic_item`)."""
    sites_crs = services.config["sites"]["crs"]
    bbox = to_wgs84(box(*group.bounds), sites_crs).bounds
    searcher = services.searcher(sensor)
    found = searcher.search(sensor.collection, bbox, None, group_id=group.group_id)
    found = [item for item in found if _usable(sensor, item, searcher.logs[-1])]
    rows = []
    for site in group.sites:
        covering = [(item, footprint_coverage(item, site, sites_crs)) for item in found]
        covering = [(item, coverage) for item, coverage in covering if coverage > 0]
        for item, coverage in covering:
            rows.append(services.candidate(site, sensor, item, "-", _label_fractions(coverage)))
        if len(covering) > 1 and max(coverage for _, coverage in covering) < 1:
            members = [item for item, _ in covering]
            mosaic = mosaic_item(members)
            for member in members:  # the mosaic names its members; they are kept beside it
                services.items[sensor.name].setdefault(member["id"], stac_items.unsigned(member))
            rows.append(services.candidate(site, sensor, mosaic, "-",
                                           _label_fractions(footprint_coverage(mosaic, site, sites_crs))))
    return rows


def _label_fractions(coverage: float) -> dict[str, float]:
    return {"nodata_fraction": round(1 - coverage, 6), "cloud_fraction": 0.0, "invalid_fraction": round(1 - coverage, 6)}


def mosaic_item(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One STAC-like item for several class maps read together: the union of their geometries,
    the first item's properties and assets, and its members by id (``properties["xstars:mosaic"]``),
    which the build reads in that order (the first that labels a pixel labels it)."""
    from shapely.ops import unary_union

    members = sorted((stac_items.unsigned(item) for item in items), key=lambda i: i["id"])
    union = unary_union([shape(item["geometry"]) for item in members])
    first = members[0]
    return {"type": "Feature", "stac_version": first.get("stac_version", "1.0.0"),
            "id": "+".join(item["id"] for item in members), "collection": first.get("collection", ""),
            "geometry": mapping(union), "bbox": list(union.bounds),
            "properties": {**first["properties"], MOSAIC_KEY: [item["id"] for item in members]},
            "assets": first["assets"]}


def wms_candidates(sensor: Sensor, group: SearchGroup, services: Services) -> list[Candidate]:
    """A WMS layer family: one STAC-like item per site and campaign year (:func:`wms_items`)."""
    client, layers = services.wms_client(sensor)
    rows = []
    for site in group.sites:
        for item, nodata in wms_items(sensor, site, services.config["sites"]["crs"], layers, client):
            rows.append(services.candidate(site, sensor, item, str(item["properties"]["ign:campaign_year"]), {
                "nodata_fraction": nodata, "cloud_fraction": 0.0, "invalid_fraction": nodata}))
    return rows


#: How each kind of sensor is searched: (sensor, group, services) -> candidates.
CANDIDATES = {"stac_raster": raster_candidates, "stac_labels": label_candidates, "wms_layers": wms_candidates}


# ================================================================================== manifest


def merge_manifest(config: Mapping[str, Any], sites: Sequence[Site], candidate_paths: Sequence[Path],
                   out: Path, merged_items: Path | None = None) -> dict[str, Any]:
    """The manifest job: the rows every search shard chose for its sites (:func:`select_shard`),
    put in site-id order and written as the manifest, with the items they name beside it
    (:mod:`xstars.manifest`); returns the summary.

    ``merged_items``: the folder where the items jobs (:func:`merge_sensor_items`, one per
    sensor, as the workflow runs them) wrote ``<sensor>.parquet``; they are checked against the
    rows and copied. None: the items are merged here, sensor by sensor in two threads.
    No candidate is read here: each site was ranked by the shard that searched it."""
    searches = [s for path in candidate_paths for s in json.loads(searches_path(path).read_text())]
    sensors = sensors_of(config)
    ordered = sorted(sites, key=lambda s: s.site_id)
    rows = shard_rows(candidate_paths, ordered, list(sensors))
    referenced = referenced_ids(rows)
    # The items go to a folder of their own until the manifest is complete: a failed merge
    # leaves the previous manifest and its items as they were.
    target = items_dir(out)
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    # Arrow reads, sorts and writes outside the GIL: two threads, not one per sensor (each
    # holds a sensor's items at once), while the rows are written.
    def sensor_items(name: str) -> dict[str, Any] | None:
        wanted, path = referenced.get(name, set()), staging / f"{name}.parquet"
        if merged_items is None:
            return merge_items([items_dir(p) / f"{name}.parquet" for p in candidate_paths], wanted, path)
        return adopt_items(Path(merged_items) / f"{name}.parquet", wanted, path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        merged = {name: pool.submit(sensor_items, name) for name in sensors}
        writer = ManifestWriter(out, config["sites"]["crs"], provenance(config, searches),
                                int(config["build"]["samples_per_shard"]))
        writer.add_sites(rows, len(ordered), referenced)
        counts = rows_summary([rows])
        del rows
        pins = {name: future.result() for name, future in merged.items()}
    if target.exists():
        shutil.rmtree(target)
    staging.mkdir(parents=True, exist_ok=True)  # no sensor with items: an empty folder all the same
    staging.rename(target)
    writer.close(pins)
    return counts.as_dict(searches)


def merge_sensor_items(config: Mapping[str, Any], sensor: str, candidate_paths: Sequence[Path],
                       out: Path) -> dict[str, Any] | None:
    """The items job of one sensor: the items the search shards' rows name for ``sensor`` (chosen
    and fallbacks), merged once each from the shards' items files into ``out``, sorted by id;
    returns its pin, None (and an empty file) when the rows name none.

    A job of its own per sensor, beside the manifest job (which checks and copies the result,
    :func:`merge_manifest`): at France size the sensors' merges cost more CPU than the rows, and
    a Sentinel-2 merge opens 64 files whose footers name ~270 columns."""
    if sensor not in sensors_of(config):
        raise ConfigError(f"--sensor {sensor!r}: not one of the config's sensors ({', '.join(sensors_of(config))})")
    rows = pa.concat_tables([_shard_rows_file(path, ["sensor", "item_id", "fallbacks"]) for path in candidate_paths])
    wanted = referenced_ids(rows).get(sensor, set())
    pin = merge_items([items_dir(p) / f"{sensor}.parquet" for p in candidate_paths], wanted, out)
    if pin is None:  # the job's output exists all the same; the manifest pins nothing for it
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": pa.array([], pa.string())}), out)
    return pin


def adopt_items(source: Path, wanted: set[str], path: Path) -> dict[str, Any] | None:
    """An items job's file (:func:`merge_sensor_items`) copied to ``path`` beside the manifest,
    after checking that it holds every id the rows name (it was made from the same rows, unless
    one of them was rebuilt since); returns its pin, None when the rows name no item."""
    try:
        file = pq.ParquetFile(source)
        ids = file.read(columns=["id"]).column("id")
    except FileNotFoundError:
        raise DataError(f"{source}: no merged items (written by the items job, `xstars catalog items "
                        f"--sensor {source.stem}`: run it again)") from None
    except (OSError, KeyError, pa.ArrowInvalid) as err:
        raise DataError(f"{source}: not an items file ({err})") from None
    missing = wanted - set(ids.to_pylist())
    if missing:
        raise DataError(f"{source}: items {sorted(missing)[:5]} are named by the shards' rows but not in it "
                        f"(made from other rows? run `xstars catalog items --sensor {source.stem}` again)")
    if not wanted:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return {"path": path.name, "sha256": file_sha256(path), "items": file.metadata.num_rows}


def _shard_rows_file(candidates_path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows a search shard chose (:func:`rows_path`), or a DataError saying how to get them."""
    source = rows_path(candidates_path)
    try:
        return pq.read_table(source, schema=ROW_SCHEMA, columns=None if columns is None else list(columns))
    except FileNotFoundError:
        raise DataError(f"{source}: no rows beside the shard's candidates {Path(candidates_path).name} (written by "
                        "its search job, `xstars catalog search`: run it again)") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{source}: not the rows of a search shard ({err})") from None


def shard_rows(candidate_paths: Sequence[Path], sites: Sequence[Site], sensors: Sequence[str]) -> pa.Table:
    """The rows of every search shard (:func:`rows_path`) as one table in site-id order, checked:
    every site of ``sites`` (sorted by id) once, with a row per sensor in config order."""
    tables = [_shard_rows_file(path) for path in candidate_paths]
    table = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    table = table.take(pc.sort_indices(table, [("site_id", "ascending")]))  # stable: sensors stay in order
    expected_sites = pa.array([s.site_id for s in sites for _ in sensors], pa.string())
    expected_sensors = pa.array(list(sensors) * len(sites), pa.string())
    site_ids, sensor_names = table.column("site_id").combine_chunks(), table.column("sensor").combine_chunks()
    if site_ids.equals(expected_sites) and sensor_names.equals(expected_sensors):
        return table
    known = {s.site_id for s in sites}
    counts = Counter(site_ids.to_pylist())
    problem = (next((f"site {i!r} is not in the sites file" for i in counts if i not in known), None)
               or next((f"site {s.site_id!r} is in no shard's rows" for s in sites if s.site_id not in counts), None)
               or next((f"site {i!r} has {n} rows (in two shards' rows?), not {len(sensors)}"
                        for i, n in counts.items() if n != len(sensors)), None)
               or f"the shards' rows are not of the sensors {list(sensors)} (sensors changed since the search?)")
    raise DataError(f"the search shards' rows do not match the sites: {problem}; run the search again")


def build_manifest(config: Mapping[str, Any], sites: Sequence[Site], path: Path) -> tuple[list[ManifestRow], list[dict]]:
    """The whole catalog stage in one process, as the workflow's jobs do it in parallel (every
    search shard into ``<path>.search/``, then :func:`merge_manifest`): for tests, benchmarks,
    small worlds. Returns the manifest's rows and the search log."""
    folder = Path(path).with_name(Path(path).stem + ".search")
    outputs = [search_shard(config, sites, shard, folder / f"shard-{shard}.parquet")
               for shard in range(config["catalog"]["search_shards"])]
    merge_manifest(config, sites, [o.path for o in outputs], path)
    return manifest_rows(Manifest(path)), [s for o in outputs for s in o.searches]


def manifest_rows(manifest: Manifest) -> list[ManifestRow]:
    """Every row of a manifest (small manifests: tests, summaries of frozen ones stream instead)."""
    return [row for part in range(manifest.file.num_row_groups)
            for site in manifest.part(part, manifest.sites_per_row_group) for row in site]


def provenance(config: Mapping[str, Any], searches: Sequence[dict]) -> dict[str, Any]:
    """What a rebuild needs to know: the config sections of the catalog and every search made."""
    return {
        "catalogs": {name: {k: v for k, v in entry.items()} for name, entry in config["catalogs"].items()
                     if any(s["catalog"] == name for s in config["sensors"].values())},
        "sensors": config["sensors"],
        "dates": config["dates"],
        "sites": config["sites"],
        "catalog": {k: v for k, v in config["catalog"].items() if k != "manifest"},
        "seed": config["seed"],
        "searches": sorted(({k: s[k] for k in ("collection", "window", "group_id", "body", "kept")}
                            | ({"skipped": s["skipped"]} if s.get("skipped") else {}) for s in searches),
                           key=lambda s: (s["group_id"], s["collection"], s["window"])),
    }
