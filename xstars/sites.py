"""Sites: where the dataset's tiles are, and which split each belongs to.

A *site* is one square ground footprint of ``sites.footprint_m`` metres on a grid of that step
in ``sites.crs`` (Lambert-93, EPSG:2154, for mainland France): cell ``(col, row)`` covers
``[col * f, (col + 1) * f) x [row * f, (row + 1) * f)``. Sites are grid cells, so two sites
never overlap, and a site's id (``<region>_<col>_<row>``) says where it is.

How sites are drawn (deterministic for a given ``seed``):

1. Candidate cells: around each city of ``sites.cities`` the cells whose centre lies within
   ``city_radius_m`` of the city centre; with ``uniform_count > 0``, every cell of the country.
   A cell is a candidate only if its whole footprint lies inside the mainland France boundary
   shipped in ``xstars/resources/france_mainland.geojson`` (Natural Earth 1:110m, public domain).
2. Split, before drawing, so that it does not depend on which cells are drawn:
   ``blocks`` cuts the plane into square blocks of ``block_m`` and sends whole blocks to
   train/val/test; ``cities`` sends whole cities (``val_cities``, ``test_cities``; the rest and
   uniform sites to train, uniform sites by block). With ``guard``, a val/test cell that touches
   a cell of another split (8-neighbourhood) is no candidate: evaluation then never sees a tile
   adjacent to a training tile, the spatial leak that random splits of neighbouring tiles have.
3. Draw ``sites_per_city`` cells per city, then ``uniform_count`` cells among the remaining
   ones of the whole country, each with its own random stream (adding a city does not move the
   sites of the others).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from shapely.geometry import Polygon, box, shape

from xstars.config import city_lonlat, city_name
from xstars.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Region name of sites drawn uniformly over the country.
UNIFORM_REGION = "france"


@dataclass(frozen=True)
class Site:
    """One tile location: a grid cell of the sites grid, with its split."""

    site_id: str
    region: str  # city name, or UNIFORM_REGION
    col: int
    row: int
    footprint_m: float
    split: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the footprint in the sites CRS, metres."""
        f = self.footprint_m
        return (self.col * f, self.row * f, (self.col + 1) * f, (self.row + 1) * f)


def site_id(region: str, col: int, row: int) -> str:
    return f"{region}_{col}_{row}"


@functools.cache
def france_boundary(crs: str = "EPSG:2154") -> Polygon:
    """The shipped mainland France boundary, projected to ``crs``."""
    text = resources.files("xstars.resources").joinpath("france_mainland.geojson").read_text()
    geometry = shape(json.loads(text)["features"][0]["geometry"])
    # Densify first: the boundary's edges are long and a projection bends them.
    return reproject_geometry(shapely.segmentize(geometry, 0.05), "EPSG:4326", crs)


def reproject_geometry(geometry, src_crs: str, dst_crs: str):
    """A shapely geometry from ``src_crs`` to ``dst_crs`` (vertex by vertex, x/y order)."""
    transformer = Transformer.from_crs(src_crs, dst_crs, always_xy=True)

    def project(coords: np.ndarray) -> np.ndarray:
        return np.column_stack(transformer.transform(coords[:, 0], coords[:, 1]))

    return shapely.transform(geometry, project)


def city_centres(cities: Iterable[str | Mapping[str, Any]], crs: str) -> dict[str, tuple[float, float]]:
    """City name -> centre (x, y) in ``crs``, for ``sites.cities`` entries (names or objects)."""
    to_crs = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    return {city_name(city): to_crs.transform(*city_lonlat(city)) for city in cities}


def cells_near(centre: tuple[float, float], radius_m: float, footprint_m: float) -> list[tuple[int, int]]:
    """Grid cells whose centre lies within ``radius_m`` of ``centre``, sorted by (row, col)."""
    cx, cy = centre
    cols = np.arange(math.floor((cx - radius_m) / footprint_m), math.ceil((cx + radius_m) / footprint_m) + 1)
    rows = np.arange(math.floor((cy - radius_m) / footprint_m), math.ceil((cy + radius_m) / footprint_m) + 1)
    col_grid, row_grid = np.meshgrid(cols, rows)
    dist = np.hypot((col_grid + 0.5) * footprint_m - cx, (row_grid + 0.5) * footprint_m - cy)
    inside = dist <= radius_m
    return [(int(c), int(r)) for r, c in zip(row_grid[inside], col_grid[inside], strict=True)]


def cells_in(boundary: Polygon, footprint_m: float) -> list[tuple[int, int]]:
    """Every grid cell whose footprint lies entirely inside ``boundary``, sorted by (row, col)."""
    xmin, ymin, xmax, ymax = boundary.bounds
    cols = np.arange(math.floor(xmin / footprint_m), math.ceil(xmax / footprint_m))
    rows = np.arange(math.floor(ymin / footprint_m), math.ceil(ymax / footprint_m))
    col_grid, row_grid = (a.ravel() for a in np.meshgrid(cols, rows))
    return _filter_inside(list(zip(col_grid.tolist(), row_grid.tolist(), strict=True)), boundary, footprint_m)


def _filter_inside(cells: Sequence[tuple[int, int]], boundary: Polygon, footprint_m: float) -> list[tuple[int, int]]:
    if not cells:
        return []
    arr = np.asarray(cells, dtype=float)
    boxes = shapely.box(arr[:, 0] * footprint_m, arr[:, 1] * footprint_m,
                        (arr[:, 0] + 1) * footprint_m, (arr[:, 1] + 1) * footprint_m)
    shapely.prepare(boundary)
    keep = shapely.contains(boundary, boxes)
    return [tuple(map(int, c)) for c, k in zip(cells, keep, strict=True) if k]


def block_of(cell: tuple[int, int], footprint_m: float, block_m: float) -> tuple[int, int]:
    """The split block containing a cell's centre."""
    col, row = cell
    return (math.floor((col + 0.5) * footprint_m / block_m), math.floor((row + 0.5) * footprint_m / block_m))


def assign_blocks(blocks: Iterable[tuple[int, int]], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[tuple[int, int], str]:
    """Send whole blocks to splits, each block by a seeded hash of its indices.

    A block's split depends on nothing but the seed and its position: adding a city or uniform
    sites never reshuffles the splits of existing blocks. Fractions hold on average over many
    blocks (a single city of a few blocks may get no test block; use method `cities` then).
    """
    split = {}
    for bx, by in set(blocks):
        u = zlib.crc32(f"{seed}:{bx}:{by}".encode()) / 2**32
        split[(bx, by)] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return split


def guard_cells(cell_split: Mapping[tuple[int, int], str],
                split_of: Callable[[tuple[int, int]], str | None]) -> set[tuple[int, int]]:
    """Val/test cells with a neighbour (8-neighbourhood) of another split.

    ``split_of`` gives the split of any cell of the plane (None: no split), so that the guard
    band depends on the geometry only, not on which other cells happen to be candidates.
    """
    guarded = set()
    for (col, row), split in cell_split.items():
        if split == "train":
            continue
        for dc in (-1, 0, 1):
            for dr in (-1, 0, 1):
                other = split_of((col + dc, row + dr))
                if other is not None and other != split:
                    guarded.add((col, row))
    return guarded


def site_count(config: Mapping[str, Any]) -> int:
    """How many sites :func:`sample_sites` draws for ``config``: exactly this many, or it raises."""
    cfg = config["sites"]
    return len(cfg["cities"]) * int(cfg["sites_per_city"]) + int(cfg["uniform_count"])


def sample_sites(config: Mapping[str, Any]) -> list[Site]:
    """Draw the sites of a validated config (see the module docstring)."""
    cfg = config["sites"]
    split_cfg = cfg["split"]
    seed = int(config["seed"])
    footprint_m = float(cfg["footprint_m"])
    boundary = france_boundary(cfg["crs"])
    centres = city_centres(cfg["cities"], cfg["crs"])

    # 1. candidates, each with the region it is drawn for (first city wins on overlap)
    region_of: dict[tuple[int, int], str] = {}
    cities = [city_name(c) for c in cfg["cities"]]
    for index, city in enumerate(cities):
        if not boundary.contains(shapely.Point(centres[city])):
            raise ConfigError(
                f"sites.cities[{index}]: {city!r} lies outside the mainland France boundary "
                "(xstars/resources/france_mainland.geojson)"
            )
        near = _filter_inside(cells_near(centres[city], cfg["city_radius_m"], footprint_m), boundary, footprint_m)
        for cell in near:
            region_of.setdefault(cell, city)
    if cfg["uniform_count"] > 0:
        for cell in cells_in(boundary, footprint_m):
            region_of.setdefault(cell, UNIFORM_REGION)

    # 2. split before drawing, then the guard band
    cell_split = split_cells(region_of, split_cfg, footprint_m, seed)
    guarded = guard_cells(cell_split, _plane_split(cell_split, split_cfg, footprint_m, seed)) if split_cfg["guard"] else set()

    # 3. draw, per region and split in proportion to the split's share of the region's
    #    candidates before the guard band, so the guard does not shrink the eval splits
    chosen: dict[tuple[int, int], str] = {}
    regions = [(city, cfg["sites_per_city"], f"sites.city_radius_m={cfg['city_radius_m']:g} of {city!r}")
               for city in cities]
    if cfg["uniform_count"] > 0:
        regions.append((UNIFORM_REGION, cfg["uniform_count"], "mainland France"))
    for region, wanted, where in regions:
        cells = [c for c, r in region_of.items() if r == region and c not in chosen]
        pools = {split: sorted(c for c in cells if cell_split[c] == split and c not in guarded) for split in SPLITS}
        if sum(map(len, pools.values())) < wanted:
            key = "sites.uniform_count" if region == UNIFORM_REGION else "sites.sites_per_city"
            raise ConfigError(
                f"{key}: only {sum(map(len, pools.values()))} footprints of {footprint_m:g} m fit within "
                f"{where} inside France{' outside the split guard band' if guarded else ''}; ask for fewer "
                "sites or a larger radius"
            )
        shares = {split: sum(cell_split[c] == split for c in cells) for split in SPLITS}
        for split, count in _apportion(wanted, shares, {s: len(p) for s, p in pools.items()}).items():
            for cell in _draw(pools[split], count, seed, f"{region}/{split}"):
                chosen[cell] = region

    sites = [
        Site(site_id(region, *cell), region, cell[0], cell[1], footprint_m, cell_split[cell])
        for cell, region in chosen.items()
    ]
    sites.sort(key=lambda s: (s.region, s.row, s.col))
    counts = {split: sum(s.split == split for s in sites) for split in SPLITS}
    log.info("sites drawn=%d %s guarded_candidates=%d", len(sites), counts, len(guarded))
    return sites


def split_cells(region_of: Mapping[tuple[int, int], str], split_cfg: Mapping[str, Any], footprint_m: float,
                seed: int) -> dict[tuple[int, int], str]:
    """Split of every candidate cell (see the module docstring)."""
    blocks = {cell: block_of(cell, footprint_m, split_cfg["block_m"]) for cell in region_of}
    if split_cfg["method"] == "blocks":
        by_block = assign_blocks(blocks.values(), split_cfg["val_fraction"], split_cfg["test_fraction"], seed)
        return {cell: by_block[blocks[cell]] for cell in region_of}
    # cities: named cities go whole to val/test, the other cities to train, uniform cells by block
    named = {city: "val" for city in split_cfg["val_cities"]}
    named.update({city: "test" for city in split_cfg["test_cities"]})
    uniform_blocks = [blocks[c] for c, r in region_of.items() if r == UNIFORM_REGION]
    by_block = assign_blocks(uniform_blocks, split_cfg["val_fraction"], split_cfg["test_fraction"], seed)
    return {
        cell: by_block[blocks[cell]] if region == UNIFORM_REGION else named.get(region, "train")
        for cell, region in region_of.items()
    }


def _plane_split(cell_split: Mapping[tuple[int, int], str], split_cfg: Mapping[str, Any], footprint_m: float,
                 seed: int) -> Callable[[tuple[int, int]], str | None]:
    """Split of any cell: a candidate's own; elsewhere its block's with method `blocks`."""
    if split_cfg["method"] != "blocks":
        return cell_split.get

    def split_of(cell: tuple[int, int]) -> str | None:
        if cell in cell_split:
            return cell_split[cell]
        block = block_of(cell, footprint_m, split_cfg["block_m"])
        return assign_blocks([block], split_cfg["val_fraction"], split_cfg["test_fraction"], seed)[block]

    return split_of


def _stream(name: str) -> int:
    """A stable integer per purpose, to seed independent random streams."""
    return zlib.crc32(name.encode())


def _apportion(total: int, shares: Mapping[str, int], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` draws among splits in proportion to ``shares`` (largest remainder),
    capped by each pool's ``capacity``; what a full pool cannot take goes to the others."""
    counts = dict.fromkeys(shares, 0)
    remaining = total
    while remaining > 0:
        open_splits = [s for s in shares if counts[s] < capacity[s]]
        weight = sum(shares[s] for s in open_splits) or len(open_splits)
        exact = {s: remaining * (shares[s] if weight else 1) / weight for s in open_splits}
        step = {s: min(int(exact[s]), capacity[s] - counts[s]) for s in open_splits}
        if sum(step.values()) == 0:  # hand out one at a time by largest remainder
            best = max(open_splits, key=lambda s: (exact[s] - int(exact[s]), shares[s], s == "train"))
            step[best] = 1
        for s, n in step.items():
            counts[s] += n
        remaining = total - sum(counts.values())
    return counts


def _draw(pool: Sequence[tuple[int, int]], count: int, seed: int, region: str) -> list[tuple[int, int]]:
    rng = np.random.default_rng([seed, _stream(region)])
    picked = rng.choice(len(pool), size=count, replace=False)
    return [pool[i] for i in sorted(picked)]


# ------------------------------------------------------------------------------------- tables


def sites_frame(sites: Sequence[Site], crs: str):
    """Sites as a GeoDataFrame (one row per site, footprint polygon in ``crs``)."""
    import geopandas as gpd

    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    rows = []
    for s in sites:
        xmin, ymin, xmax, ymax = s.bounds
        lon, lat = to_wgs84.transform((xmin + xmax) / 2, (ymin + ymax) / 2)
        rows.append({"site_id": s.site_id, "region": s.region, "split": s.split, "col": s.col, "row": s.row,
                     "footprint_m": s.footprint_m, "lon": lon, "lat": lat, "geometry": box(xmin, ymin, xmax, ymax)})
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)


def write_sites(sites: Sequence[Site], path: Path, crs: str) -> Path:
    """Write the sites table as GeoParquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sites_frame(sites, crs).to_parquet(path, index=False)
    return path


def read_sites(path: Path) -> list[Site]:
    """Read a sites table written by :func:`write_sites`.

    Only the columns a :class:`Site` holds, with Arrow alone: every search, manifest and build
    job starts with this, and GeoPandas (import and geometry decoding) cost them a second."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["site_id", "region", "col", "row", "footprint_m", "split"]
    try:
        file = pq.ParquetFile(path)
        if b"geo" not in (file.schema_arrow.metadata or {}):
            raise ValueError("no GeoParquet metadata")
        table = file.read(columns=columns)
    except (OSError, ValueError, KeyError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: not a sites table ({err})") from None
    return [Site(site_id, region, int(col), int(row), float(footprint), split)
            for site_id, region, col, row, footprint, split in zip(*(table.column(c).to_pylist() for c in columns))]
