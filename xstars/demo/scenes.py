"""The demo world's satellite products on the real tile grids: Sentinel-2, Landsat, WorldCover.

Each city is rendered as before (from its ground truth, at its extent), but on the pixel grid of
every real product that covers it (:mod:`xstars.demo.tiling`): a Sentinel-2 MGRS tile (two near
a tile overlap or a zone border), a WRS-2 scene in the UTM zone of its centre, a 3-degree
WorldCover tile (two on a tile edge). The rendered pieces are staged city by city, then each
product is written at its full size as a sparse tiled GeoTIFF (:mod:`xstars.demo.sparse`): the
blocks no city touches read as nodata, and the item describes the whole product (its full grid
per asset, the footprint of its data).

A product may hold several cities (a Landsat scene over two); its acquisitions, misregistration
and orbit come from its *owner*, the first city (in config order) it covers, so the same scene
is the same acquisition for all of them, and a datatake seen in two tiles has the same date,
orbit, misregistration and clouds in both.

Each Sentinel-2 tile has acquisitions from the orbit that covers it and one from the
neighbouring orbit whose swath edge crosses the tile: that scene has data on one side of a
line along the track only (the item's geometry is the tile cut by it, the files are nodata
beyond it). For the first city the edge crosses the city itself, so some of its sites are
partly covered by that scene.
"""

from __future__ import annotations

import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from shapely.geometry import Polygon, box, mapping

from xstars.demo import layout, tiling
from xstars.demo.items import (
    LANDSAT_BANDS,
    S2_BANDS,
    LandsatAcquisition,
    S2Acquisition,
    landsat_item,
    s2_item,
    worldcover_item,
)
from xstars.demo.landscape import LAMBERT93, GroundTruth
from xstars.demo.render import (
    CloudField,
    FractionCube,
    SensorGrid,
    apply_atmosphere,
    encode_landsat_sr,
    encode_landsat_st,
    encode_s2,
    footprint_mask,
    landsat_qa_pixel,
    make_clouds,
    psf_blur,
    s2_scene_classification,
    warp_to_grid,
)
from xstars.demo.sparse import Piece, overview_factors, stage_piece, write_sparse
from xstars.demo.spectra import MATERIAL_ID

#: Sentinel-2 schedule of every tile: (date, time, platform, baselines (reprocessings), cloud
#: fraction, proj key, orbit: "own" covers the tile, "edge" is the neighbour's swath edge).
S2_SCHEDULE = [
    ("2021-07-12", "10:56:21", "Sentinel-2A", ("02.12", "05.00"), 0.04, "proj:epsg", "own"),
    ("2022-04-18", "10:50:39", "Sentinel-2B", ("04.00",), 0.25, "proj:epsg", "own"),
    ("2022-06-27", "10:40:29", "Sentinel-2B", ("04.00",), 0.0, "proj:epsg", "edge"),
    ("2022-08-16", "10:56:29", "sentinel-2a", ("04.00",), 0.01, "proj:epsg", "own"),
    ("2023-06-11", "10:50:41", "sentinel-2b", ("05.09",), 0.10, "proj:code", "own"),
    ("2023-10-04", "10:56:31", "Sentinel-2A", ("05.09",), 0.60, "proj:code", "own"),
]
#: Generation time of each processing baseline (the reprocessing campaign of 2023 for 05.00).
REPROCESSING_TIME = {"05.00": datetime(2023, 2, 10, 8, 12, 33, tzinfo=UTC)}
#: Azimuth of a descending Sentinel-2 ground track over France: the direction of a swath edge.
S2_TRACK_AZIMUTH_DEG = 193.0
#: Distance of the swath edge from the owner city (other than the first), on the city's side of the tile.
S2_EDGE_OFFSET_M = 6000.0

#: Landsat schedule of every WRS-2 scene: (date, time, platform, cloud fraction, collection
#: category, processing level). Dates move by 7 days a path (adjacent paths, 16-day cycle).
LANDSAT_SCHEDULE = [
    ("2021-08-03", "10:41:12", "landsat-8", 0.03, "T1", "L2SP"),
    ("2022-06-19", "10:41:37", "landsat-8", 0.0, "T2", "L2SP"),
    ("2022-07-21", "10:41:40", "landsat-8", 0.30, "T1", "L2SP"),
    ("2022-09-07", "10:42:01", "landsat-9", 0.05, "T1", "L2SP"),
    ("2023-05-20", "10:41:55", "landsat-8", 0.08, "T1", "L2SR"),
]

#: WorldCover editions: (year, version). The 2020 map (v100) classed more grassland as cropland.
WORLDCOVER_EDITIONS = [(2020, "v100"), (2021, "v200")]

S2_PSF_SIGMA_PX, LANDSAT_PSF_SIGMA_PX = 0.45, 0.5
MAX_SHIFT_PX = {"sentinel-2-l2a": 1.5, "landsat-c2-l2": 1.0}
#: Content windows are placed on multiples of this (m) from a product's origin: whole pixels at
#: every resolution of the product, aligned on its coarsest overview.
S2_ALIGN_M, LANDSAT_ALIGN_M, WORLDCOVER_ALIGN_PX = 480.0, 240.0, 32
_GEOD = Geod(ellps="WGS84")


# ============================================================================ shared helpers

def rng_of(seed: int, index: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, *purpose])


def sun_at(lat: float, when: datetime) -> tuple[float, float]:
    """(azimuth, elevation) in degrees at about 10:50 solar time: enough for shadows."""
    doy = when.timetuple().tm_yday
    declination = 23.44 * np.sin(2 * np.pi * (doy - 81) / 365.0)
    return 152.0, round(float(90.0 - lat + declination - 8.0), 3)


def draw_shift(rng: np.random.Generator, max_px: float, gsd_m: float) -> tuple[float, float]:
    """A known misregistration of up to ``max_px`` pixels, at least 0.2 px in norm."""
    while True:
        dx, dy = rng.uniform(-max_px, max_px, size=2)
        if np.hypot(dx, dy) >= 0.2:
            return round(float(dx) * gsd_m, 3), round(float(dy) * gsd_m, 3)


def shift_record(shift: tuple[float, float], gsd_m: float, crs: str, city: str) -> dict[str, Any]:
    return {"dx_m": shift[0], "dy_m": shift[1], "gsd_m": gsd_m, "dx_px": round(shift[0] / gsd_m, 4),
            "dy_px": round(shift[1] / gsd_m, 4), "crs": crs, "city": city}


def _doy(when: datetime) -> int:
    return when.timetuple().tm_yday


def city_lonlat_bounds(truth_bounds_l93: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    return transform_bounds(LAMBERT93, "EPSG:4326", *truth_bounds_l93, densify_pts=21)


def content_grid(truth_bounds_l93: tuple[float, float, float, float], full: SensorGrid, align_m: float) -> SensorGrid:
    """The window of ``full`` (a product's whole grid) around the truth's extent, its edges on
    multiples of ``align_m`` from the product's origin, clipped to the product."""
    xmin, ymin, xmax, ymax = transform_bounds(LAMBERT93, full.crs, *truth_bounds_l93, densify_pts=21)
    x0, y1 = full.xmin, full.ymax
    left = max(np.floor((xmin - x0) / align_m) * align_m, 0.0)
    top = max(np.floor((y1 - ymax) / align_m) * align_m, 0.0)
    right = min(np.ceil((xmax - x0) / align_m) * align_m, full.shape[1] * full.gsd_m)
    bottom = min(np.ceil((y1 - ymin) / align_m) * align_m, full.shape[0] * full.gsd_m)
    shape = (round((bottom - top) / full.gsd_m), round((right - left) / full.gsd_m))
    return SensorGrid(full.crs, full.gsd_m, x0 + left, y1 - top, shape)


def _offset(full: SensorGrid, part: SensorGrid) -> tuple[int, int]:
    return round((full.ymax - part.ymax) / full.gsd_m), round((part.xmin - full.xmin) / full.gsd_m)


def _lonlat(geometry, crs: str):
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return shapely.transform(geometry, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))


def clouds_l93(rng: np.random.Generator, truth: GroundTruth, gsd_m: float, cover: float,
               sun: tuple[float, float]) -> tuple[CloudField, Any]:
    """Clouds over a city drawn once on a Lambert-93 grid, so every tile of a datatake sees the same."""
    xmin, ymin, xmax, ymax = truth.grid.bounds
    shape = (round((ymax - ymin) / gsd_m), round((xmax - xmin) / gsd_m))
    return make_clouds(rng, shape, gsd_m, cover, *sun), Affine(gsd_m, 0, xmin, 0, -gsd_m, ymax)


def clouds_on(clouds: CloudField, transform, grid: SensorGrid, shift: tuple[float, float]) -> CloudField:
    alpha = np.nan_to_num(warp_to_grid(clouds.alpha, transform, grid, shift, Resampling.bilinear))
    shadow = np.nan_to_num(warp_to_grid(clouds.shadow, transform, grid, shift, Resampling.bilinear))
    return CloudField(alpha.astype(np.float32), shadow.astype(np.float32))


def render_band(cube: FractionCube, doy: int, center: float, fwhm: float, grid: SensorGrid,
                shift: tuple[float, float], psf_sigma_px: float) -> np.ndarray:
    """Surface reflectance of one band on the sensor grid (PSF applied on the fine grid)."""
    surface = cube.reflectance(doy, center, fwhm)
    surface = psf_blur(surface, psf_sigma_px * grid.gsd_m / cube.gsd_m)
    return np.nan_to_num(warp_to_grid(surface, cube.transform, grid, shift))


@dataclass
class Asset:
    """One file of a product: its full grid, encoding and the pieces staged for it."""

    grid: SensorGrid
    count: int
    dtype: str
    nodata: float
    how: str  # overview resampling: "average" or "nearest"
    pieces: list[Piece] = field(default_factory=list)

    @property
    def factors(self) -> tuple[int, ...]:
        return overview_factors(max(self.grid.shape))


@dataclass
class Product:
    """An item being assembled: its files' assets and what its JSON needs once every city is in."""

    collection: str
    item_id: str
    assets: dict[str, Asset]
    meta: dict[str, Any]
    counts: Counter = field(default_factory=Counter)


class Staging:
    """The products of the world and their staged pieces (a folder removed once they are written)."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "staging"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.products: dict[str, Product] = {}

    def product(self, collection: str, item_id: str, make_assets, meta: dict[str, Any]) -> Product:
        key = f"{collection}/{item_id}"
        if key not in self.products:
            self.products[key] = Product(collection, item_id, make_assets(), meta)
        return self.products[key]

    def stage(self, product: Product, asset: str, city: str, part: SensorGrid, array: np.ndarray) -> None:
        spec = product.assets[asset]
        row, col = _offset(spec.grid, part)
        stem = self.dir / product.collection / product.item_id / f"{asset}.{city}"
        spec.pieces.append(stage_piece(stem, array, spec.nodata, spec.factors, spec.how, row, col))

    def write(self, threads: int = 2) -> None:
        """Assemble every product's files from their pieces. Each file is GDAL's copy of its own
        VRT (GDAL works outside the GIL), so ``threads`` files are written at once; each file's
        bytes do not depend on the order."""
        jobs = [(layout.files_dir(self.root) / product.collection / product.item_id / f"{name}.tif", spec)
                for product in self.products.values() for name, spec in product.assets.items()]

        def write(job: tuple[Path, Asset]) -> None:
            path, spec = job
            write_sparse(path, spec.grid.shape, spec.count, spec.dtype, spec.grid.crs, spec.grid.transform,
                         spec.nodata, spec.pieces, spec.factors)

        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            list(pool.map(write, jobs))
        shutil.rmtree(self.dir, ignore_errors=True)


# ============================================================================== Sentinel-2

@dataclass(frozen=True)
class SwathEdge:
    """The edge of a neighbouring orbit's swath: data on one side of a line along the track."""

    lon: float
    lat: float
    east_side: bool  # whether the data lies east of the line

    def half_plane(self, crs: str) -> Polygon:
        """The data side as a polygon in ``crs`` (wide enough to hold any tile)."""
        to = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        lon1, lat1, _ = _GEOD.fwd(self.lon, self.lat, S2_TRACK_AZIMUTH_DEG, 50_000)
        (x0, x1), (y0, y1) = to.transform([self.lon, lon1], [self.lat, lat1])
        ux, uy = (x1 - x0) / 50_000, (y1 - y0) / 50_000  # along the track (southwards)
        nx, ny = (-uy, ux) if self.east_side else (uy, -ux)  # across the track, towards the data
        far = 400_000.0
        a = (x0 - far * ux, y0 - far * uy)
        b = (x0 + far * ux, y0 + far * uy)
        return Polygon([a, b, (b[0] + far * nx, b[1] + far * ny), (a[0] + far * nx, a[1] + far * ny)])

    def mask(self, grid: SensorGrid) -> np.ndarray:
        """True on the data side, per pixel centre of ``grid``."""
        plane = self.half_plane(grid.crs)
        (ax, ay), (bx, by) = plane.exterior.coords[0], plane.exterior.coords[1]
        cx, cy = plane.exterior.coords[2]
        xs = grid.xmin + (np.arange(grid.shape[1]) + 0.5) * grid.gsd_m
        ys = grid.ymax - (np.arange(grid.shape[0]) + 0.5) * grid.gsd_m
        side = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        cross = (bx - ax) * (ys[:, None] - ay) - (by - ay) * (xs[None, :] - ax)
        return np.sign(cross) == np.sign(side)


def s2_edge_of(city_index: int, lon: float, lat: float, tile: tiling.S2Tile) -> SwathEdge:
    """The swath edge of a city's tiles: through the first city itself, else 6 km from the city
    towards the tile's centre (the data on the city's side: a large no-data part)."""
    x, _ = Transformer.from_crs("EPSG:4326", tile.crs, always_xy=True).transform(lon, lat)
    east_side = x > tile.xmin + tiling.S2_TILE_M / 2
    if city_index == 0:
        edge_lon, edge_lat, _ = _GEOD.fwd(lon, lat, 90.0 if east_side else 270.0, -150.0)
    else:
        edge_lon, edge_lat, _ = _GEOD.fwd(lon, lat, 270.0 if east_side else 90.0, S2_EDGE_OFFSET_M)
    return SwathEdge(round(edge_lon, 6), round(edge_lat, 6), east_side)


def _scl_percentages(counts: Counter, nodata_pct: float) -> dict[str, float]:
    valid = max(sum(v for k, v in counts.items() if k != 0), 1)

    def pct(*codes: int) -> float:
        return 100.0 * sum(counts[c] for c in codes) / valid
    return {"cloud": pct(8, 9, 10), "cloud_high": pct(9), "cloud_medium": pct(8), "cirrus": pct(10),
            "shadow": pct(3), "vegetation": pct(4), "not_vegetated": pct(5), "water": pct(6), "nodata": nodata_pct}


def s2_tile_grid(tile: tiling.S2Tile, gsd_m: float) -> SensorGrid:
    return SensorGrid(tile.crs, float(gsd_m), tile.xmin, tile.ymax, tile.shape(gsd_m))


def _s2_assets(tile: tiling.S2Tile) -> dict[str, Asset]:
    assets = {band: Asset(s2_tile_grid(tile, gsd), 1, "uint16", 0, "average") for band, (*_, gsd) in S2_BANDS.items()}
    assets["SCL"] = Asset(s2_tile_grid(tile, 20), 1, "uint8", 0, "nearest")
    assets["visual"] = Asset(s2_tile_grid(tile, 10), 3, "uint8", 0, "average")
    return assets


@dataclass(frozen=True)
class S2Plan:
    """A tile, the city owning its acquisitions (its orbit, dates, misregistration) and its swath edge."""

    tile: tiling.S2Tile
    owner_index: int
    owner_lat: float
    edge: SwathEdge

    def acquisitions(self) -> list[tuple[int, datetime, str, tuple[str, ...], float, str, int]]:
        own_orbit = 51 + 43 * self.owner_index
        out = []
        for k, (day, clock, platform, baselines, cover, proj_key, orbit) in enumerate(S2_SCHEDULE):
            when = datetime.fromisoformat(f"{day}T{clock}+00:00") + timedelta(days=self.owner_index * 3)
            relative_orbit = (own_orbit - 1 + (43 if orbit == "edge" else 0)) % 143 + 1  # 143 orbits a cycle
            out.append((k, when, platform, baselines, cover, proj_key, relative_orbit))
        return out

    def is_edge(self, k: int) -> bool:
        return S2_SCHEDULE[k][6] == "edge"

    def geometry(self, k: int):
        """The scene's data footprint in the tile's CRS: the tile, cut by the swath edge."""
        footprint = box(*self.tile.bounds)
        return footprint.intersection(self.edge.half_plane(self.tile.crs)) if self.is_edge(k) else footprint


def plan_s2(cities: list[tuple[int, float, float, tuple[float, float, float, float]]]) -> dict[str, S2Plan]:
    """Every tile holding a city's extent, owned by the first city it holds (``cities``: index,
    lon, lat, lon/lat bounds of the extent)."""
    plans: dict[str, S2Plan] = {}
    for index, lon, lat, bounds in cities:
        tiles = tiling.s2_tiles_covering(*bounds)
        edge = s2_edge_of(index, lon, lat, tiles[0]) if tiles else None
        for tile in tiles:
            plans.setdefault(tile.tile_id, S2Plan(tile, index, lat, edge))
    return plans


def stage_s2(staging: Staging, seed: int, city_index: int, city: str, truth: GroundTruth, cube: FractionCube,
             plans: dict[str, S2Plan], shifts: dict[str, Any]) -> list[str]:
    """Render one city on every tile holding it; returns the tiles' ids."""
    bounds = city_lonlat_bounds(truth.grid.bounds)
    tiles = [t.tile_id for t in tiling.s2_tiles_covering(*bounds)]
    water_frac = cube.fractions[..., MATERIAL_ID["water"]]
    cloud_cache: dict[tuple, tuple[CloudField, Any]] = {}
    schedules = {tile_id: plans[tile_id].acquisitions() for tile_id in tiles}
    for k in range(len(S2_SCHEDULE)):
        # The blurred surface of a band does not depend on the tile: computed once for all of them.
        surfaces: dict[tuple, np.ndarray] = {}

        def surface_on(when: datetime, center: float, fwhm: float, grid: SensorGrid, shift: tuple[float, float],
                       surfaces: dict[tuple, np.ndarray] = surfaces) -> np.ndarray:
            key = (when, center, grid.gsd_m)
            if key not in surfaces:
                sigma = S2_PSF_SIGMA_PX * grid.gsd_m / cube.gsd_m
                surfaces[key] = psf_blur(cube.reflectance(_doy(when), center, fwhm), sigma)
            return np.nan_to_num(warp_to_grid(surfaces[key], cube.transform, grid, shift))

        for tile_id in tiles:
            plan = plans[tile_id]
            grid10 = content_grid(truth.grid.bounds, s2_tile_grid(plan.tile, 10), S2_ALIGN_M)
            grid20 = grid10.with_gsd(20.0)
            _, when, platform, baselines, cover, proj_key, orbit = schedules[tile_id][k]
            shift = draw_shift(rng_of(seed, plan.owner_index, 1, k), MAX_SHIFT_PX["sentinel-2-l2a"], 10.0)
            sun = sun_at(plan.owner_lat, when)
            if (when, cover) not in cloud_cache:
                cloud_cache[(when, cover)] = clouds_l93(rng_of(seed, city_index, 1, k, 1), truth, 20.0, cover, sun)
            clouds, clouds_transform = cloud_cache[(when, cover)]
            noise = rng_of(seed, city_index, 1, k, plan.tile.zone)
            refl: dict[str, np.ndarray] = {}
            valid: dict[int, np.ndarray] = {}
            clouds_at: dict[int, CloudField] = {}
            for band, (_, _, center, fwhm, gsd) in S2_BANDS.items():
                grid = grid10.with_gsd(gsd)
                if gsd not in valid:
                    valid[gsd] = footprint_mask(cube, grid, shift)
                    if plan.is_edge(k):
                        valid[gsd] &= plan.edge.mask(grid)
                    clouds_at[gsd] = clouds_on(clouds, clouds_transform, grid, shift)
                surface = surface_on(when, center, fwhm, grid, shift)
                toa = apply_atmosphere(surface, clouds_at[gsd], center)
                refl[band] = toa + noise.normal(0.0, 0.004, size=toa.shape).astype(np.float32)
            clouds20 = clouds_at[20]
            red20 = surface_on(when, 0.665, 0.038, grid20, shift)
            water20 = np.nan_to_num(warp_to_grid(water_frac, cube.transform, grid20, shift)) > 0.5
            scl = s2_scene_classification(clouds20, apply_atmosphere(red20, clouds20, 0.665), refl["B8A"],
                                          water20, valid[20])
            tci = np.stack([np.clip(refl[b] * 1275.0, 0, 255) for b in ("B04", "B03", "B02")]).astype(np.uint8)
            tci[:, ~valid[10]] = 0
            for baseline in baselines:
                gen_time = REPROCESSING_TIME.get(baseline, when + timedelta(hours=2, minutes=34, seconds=17))
                acq = S2Acquisition(when, platform, baseline, gen_time, tile_id, orbit, proj_key)
                product = staging.product("sentinel-2-l2a", acq.item_id, lambda tile=plan.tile: _s2_assets(tile),
                                          {"acq": acq, "plan": plan, "k": k, "sun": sun})
                for band, (*_, gsd) in S2_BANDS.items():
                    staging.stage(product, band, city, grid10.with_gsd(gsd), encode_s2(refl[band], valid[gsd], baseline))
                staging.stage(product, "SCL", city, grid20, scl)
                staging.stage(product, "visual", city, grid10, tci)
                codes, counts = np.unique(scl[valid[20]], return_counts=True)
                product.counts.update({int(c): int(n) for c, n in zip(codes, counts)})
                shifts[f"sentinel-2-l2a/{acq.item_id}"] = shift_record(shift, 10.0, plan.tile.crs, city)
    return tiles


def s2_items(staging: Staging) -> list[dict[str, Any]]:
    items = []
    for product in staging.products.values():
        if product.collection != "sentinel-2-l2a":
            continue
        plan, k = product.meta["plan"], product.meta["k"]
        footprint = plan.geometry(k)
        nodata_pct = 100.0 * (1.0 - footprint.area / box(*plan.tile.bounds).area)
        geometry = mapping(_lonlat(footprint.simplify(1.0), plan.tile.crs)) if plan.is_edge(k) else \
            {"type": "Polygon", "coordinates": [[list(p) for p in plan.tile.corners_lonlat(per_side=1)]]}
        items.append(s2_item(product.meta["acq"], s2_tile_grid(plan.tile, 10), geometry,
                             _scl_percentages(product.counts, round(nodata_pct, 6)), product.meta["sun"]))
    return items


# ================================================================================= Landsat

#: USGS's products frame a scene with fill east and west of its footprint's box: the recorded
#: items' grids are 180-250 px wider than their footprints' boxes, no taller.
LANDSAT_FRAME_PAD_M = 3_000.0


def landsat_scene_grid(scene: tiling.WrsScene) -> SensorGrid:
    """The scene's whole 30 m grid in the UTM zone of its centre, pixel centres on multiples of 30 m
    (origins at 15 m past a multiple of 30, as USGS's products): the footprint's box, with
    ``LANDSAT_FRAME_PAD_M`` of fill east and west (about 7,600-7,800 px a side, as recorded)."""
    to = Transformer.from_crs("EPSG:4326", scene.crs, always_xy=True)
    xs, ys = to.transform(*zip(*scene.corners_lonlat()))
    pad = LANDSAT_FRAME_PAD_M
    xmin = np.floor((min(xs) - pad - 15) / 30) * 30 + 15
    ymax = np.ceil((max(ys) - 15) / 30) * 30 + 15
    xmax, ymin = np.ceil((max(xs) + pad - 15) / 30) * 30 + 15, np.floor((min(ys) - 15) / 30) * 30 + 15
    return SensorGrid(scene.crs, 30.0, float(xmin), float(ymax), (round((ymax - ymin) / 30), round((xmax - xmin) / 30)))


def _landsat_assets(grid: SensorGrid, level: str) -> dict[str, Asset]:
    assets = {band: Asset(grid, 1, "uint16", 0, "average") for band in LANDSAT_BANDS}
    if level == "L2SP":  # surface temperature: only the L2SP products have it
        assets["lwir11"] = Asset(grid, 1, "uint16", 0, "average")
    assets["qa_pixel"] = Asset(grid, 1, "uint16", 1, "nearest")
    return assets


def plan_landsat(cities: list[tuple[int, float, float, tuple[float, float, float, float]]]) -> dict[str, tuple]:
    """Every WRS-2 scene holding a city's extent -> (scene, owner index, owner lat)."""
    plans: dict[str, tuple] = {}
    for index, _, lat, bounds in cities:
        for scene in tiling.wrs2_scenes_covering(*bounds):
            plans.setdefault(f"{scene.path:03d}{scene.row:03d}", (scene, index, lat))
    return plans


def stage_landsat(staging: Staging, seed: int, city_index: int, city: str, truth: GroundTruth, cube: FractionCube,
                  plans: dict[str, tuple], shifts: dict[str, Any]) -> list[str]:
    bounds = city_lonlat_bounds(truth.grid.bounds)
    keys = [f"{s.path:03d}{s.row:03d}" for s in tiling.wrs2_scenes_covering(*bounds)]
    water_frac = cube.fractions[..., MATERIAL_ID["water"]]
    built = sum(cube.fractions[..., MATERIAL_ID[n]] for n in ("road_asphalt", "roof_tile", "roof_grey"))
    for key in keys:
        scene, owner, owner_lat = plans[key]
        full = landsat_scene_grid(scene)
        grid30 = content_grid(truth.grid.bounds, full, LANDSAT_ALIGN_M)
        for k, (day, clock, platform, cover, category, level) in enumerate(LANDSAT_SCHEDULE):
            when = datetime.fromisoformat(f"{day}T{clock}+00:00") + timedelta(days=(scene.path * 7) % 16)
            acq = LandsatAcquisition(when, platform, scene.path, scene.row, when + timedelta(days=9), category, level)
            shift = draw_shift(rng_of(seed, owner, 2, k, scene.path), MAX_SHIFT_PX["landsat-c2-l2"], 30.0)
            sun = sun_at(owner_lat, when)
            rng = rng_of(seed, city_index, 2, k, scene.path)
            clouds, clouds_transform = clouds_l93(rng, truth, 30.0, cover, sun)
            clouds = clouds_on(clouds, clouds_transform, grid30, shift)
            valid = footprint_mask(cube, grid30, shift)
            product = staging.product("landsat-c2-l2", acq.item_id, lambda full=full, level=level: _landsat_assets(full, level),
                                      {"acq": acq, "scene": scene, "grid": full, "sun": sun})
            for band, (_, _, center, fwhm, _) in LANDSAT_BANDS.items():
                surface = render_band(cube, _doy(when), center, fwhm, grid30, shift, LANDSAT_PSF_SIGMA_PX)
                toa = apply_atmosphere(surface, clouds, center) + rng.normal(0, 0.005, size=surface.shape)
                staging.stage(product, band, city, grid30, encode_landsat_sr(toa, valid))
            if "lwir11" in product.assets:
                # Surface temperature: seasonal base, warmer built-up, cooler water; clouds are cold.
                season = np.sin(2 * np.pi * (_doy(when) - 110) / 365.0)
                kelvin_fine = 288.0 + 10.0 * season + 8.0 * built - 6.0 * water_frac
                kelvin = np.nan_to_num(warp_to_grid(kelvin_fine.astype(np.float32), cube.transform, grid30, shift))
                kelvin = kelvin * (1 - clouds.alpha) + 255.0 * clouds.alpha
                staging.stage(product, "lwir11", city, grid30, encode_landsat_st(kelvin, valid))
            water = np.nan_to_num(warp_to_grid(water_frac, cube.transform, grid30, shift)) > 0.5
            staging.stage(product, "qa_pixel", city, grid30, landsat_qa_pixel(clouds, water, valid))
            product.counts.update({"cloud": int(((clouds.alpha > 0.35) & valid).sum()), "valid": int(valid.sum())})
            shifts[f"landsat-c2-l2/{acq.item_id}"] = shift_record(shift, 30.0, full.crs, city)
    return keys


def landsat_items(staging: Staging) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The Landsat items, and each one's MTL.json text (written beside its files)."""
    items, mtl = [], {}
    for product in staging.products.values():
        if product.collection != "landsat-c2-l2":
            continue
        acq, scene, sun = product.meta["acq"], product.meta["scene"], product.meta["sun"]
        cloud_cover = 100.0 * product.counts["cloud"] / max(product.counts["valid"], 1)
        geometry = {"type": "Polygon", "coordinates": [[list(p) for p in scene.corners_lonlat()]]}
        items.append(landsat_item(acq, product.meta["grid"], geometry, cloud_cover, sun))
        mtl[acq.item_id] = {"LANDSAT_METADATA_FILE": {
            "PRODUCT_CONTENTS": {"LANDSAT_PRODUCT_ID": acq.item_id, "PROCESSING_LEVEL": acq.processing_level,
                                 "COLLECTION_CATEGORY": acq.collection_category},
            "LEVEL2_SURFACE_REFLECTANCE_PARAMETERS": {"REFLECTANCE_MULT_BAND_4": "2.75E-05",
                                                      "REFLECTANCE_ADD_BAND_4": "-0.200000"},
            "IMAGE_ATTRIBUTES": {"CLOUD_COVER": f"{cloud_cover:.2f}", "SUN_AZIMUTH": sun[0],
                                 "SUN_ELEVATION": sun[1], "WRS_PATH": scene.path, "WRS_ROW": scene.row}}}
    return items, mtl


# ============================================================================== WorldCover

def worldcover_tile_grid(name: str) -> SensorGrid:
    west, north = tiling.worldcover_tile_origin(name)
    n = round(tiling.WORLDCOVER_TILE_DEG / tiling.WORLDCOVER_STEP_DEG)
    return SensorGrid("EPSG:4326", tiling.WORLDCOVER_STEP_DEG, west, north, (n, n))


def worldcover_item_id(year: int, version: str, tile: str) -> str:
    return f"ESA_WorldCover_10m_{year}_{version}_{tile}"


def stage_worldcover(staging: Staging, city: str, truth: GroundTruth, labels: np.ndarray) -> list[str]:
    """The city's labels on the global 1/12000-degree grid, cut along the 3-degree tiles it touches,
    staged in both editions."""
    step = tiling.WORLDCOVER_STEP_DEG
    west, south, east, north = city_lonlat_bounds(truth.grid.bounds)
    cell = WORLDCOVER_ALIGN_PX * step
    # Global pixel indices of the window (multiples of the alignment; tiles are 36000 px).
    c0, c1 = int(np.floor(west / cell)) * WORLDCOVER_ALIGN_PX, int(np.ceil(east / cell)) * WORLDCOVER_ALIGN_PX
    r0, r1 = int(np.floor(-north / cell)) * WORLDCOVER_ALIGN_PX, int(np.ceil(-south / cell)) * WORLDCOVER_ALIGN_PX
    window = SensorGrid("EPSG:4326", step, c0 * step, -r0 * step, (r1 - r0, c1 - c0))
    v200 = np.zeros(window.shape, dtype=np.uint8)
    reproject(labels, v200, src_transform=truth.grid.transform, src_crs=LAMBERT93, dst_transform=window.transform,
              dst_crs=window.crs, resampling=Resampling.mode, src_nodata=0, dst_nodata=0)
    v100 = np.where(v200 == 30, 40, v200).astype(np.uint8)
    tiles = tiling.worldcover_tiles_covering(west, south, east, north)
    per_tile = round(tiling.WORLDCOVER_TILE_DEG / step)
    for name in tiles:
        full = worldcover_tile_grid(name)
        top, left = round((full.ymax - window.ymax) / step), round((window.xmin - full.xmin) / step)
        rows = slice(max(-top, 0), min(per_tile - top, window.shape[0]))
        cols = slice(max(-left, 0), min(per_tile - left, window.shape[1]))
        part = SensorGrid("EPSG:4326", step, window.xmin + cols.start * step, window.ymax - rows.start * step,
                          (rows.stop - rows.start, cols.stop - cols.start))
        for (year, version), content in zip(WORLDCOVER_EDITIONS, (v100, v200)):
            item_id = worldcover_item_id(year, version, name)
            product = staging.product("esa-worldcover", item_id,
                                      lambda full=full: {"map": Asset(full, 1, "uint8", 0, "nearest")},
                                      {"year": year, "grid": full})
            staging.stage(product, "map", city, part, content[rows, cols])
    return tiles


def worldcover_items(staging: Staging) -> list[dict[str, Any]]:
    items = []
    for product in staging.products.values():
        if product.collection != "esa-worldcover":
            continue
        grid = product.meta["grid"]
        w, s, e, n = grid.bounds
        geometry = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
        items.append(worldcover_item(product.item_id, grid, geometry, product.meta["year"]))
    return items
