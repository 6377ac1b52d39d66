"""Ground truth of one synthetic city: a material map in Lambert-93 at sub-metre resolution.

The landscape is built in layers, each one a small function, later layers painting over
earlier ones, the way a French peri-urban area reads from the air:

1. agricultural parcels: long rectangles on a rotated cadastre, each with its own crop;
2. woods: smooth random blobs outside the town;
3. a meandering river with wetland banks and a couple of ponds;
4. the town: a rotated street grid whose blocks are dense (buildings around a courtyard),
   residential (detached houses in gardens) or parks, thinning out with distance;
5. arterial roads radiating from the centre (with bridges over the river).

Everything is deterministic given the random generator. Coordinates are metres in EPSG:2154.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage
from shapely.geometry import LineString, Point

from xstars.demo.spectra import MATERIAL_ID
from xstars.demo.threads import in_threads

LAMBERT93 = "EPSG:2154"


@dataclass(frozen=True)
class CityGrid:
    """The ground-truth grid of one city: a square of ``extent_m`` centred on (cx, cy) in L93."""

    name: str
    cx: float
    cy: float
    extent_m: float
    gsd_m: float

    @property
    def size(self) -> int:
        return round(self.extent_m / self.gsd_m)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        h = self.extent_m / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def transform(self) -> Affine:
        xmin, _, _, ymax = self.bounds
        return Affine(self.gsd_m, 0.0, xmin, 0.0, -self.gsd_m, ymax)

    def coords(self, r0: int = 0, r1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates of rows r0:r1 relative to the centre, float32 (x east, y north)."""
        n = self.size
        r1 = n if r1 is None else r1
        offsets = (np.arange(n, dtype=np.float32) + 0.5) * self.gsd_m - self.extent_m / 2
        return offsets[None, :], -offsets[r0:r1, None]


@dataclass
class GroundTruth:
    """Material id per pixel and a per-object brightness factor (roof colours, field vigour)."""

    grid: CityGrid
    material: np.ndarray  # uint8 (size, size)
    brightness: np.ndarray  # float32 (size, size), around 1.0


class NoiseField:
    """Zero-mean, unit-variance smooth noise over the grid, built from a coarse random field.

    Stored at half resolution and expanded strip by strip: the features are tens of metres
    across, so the last factor 2 changes nothing visible and keeps memory at a quarter.
    """

    def __init__(self, rng: np.random.Generator, size: int, cell: int, sigma: float):
        half = (size + 1) // 2
        coarse_n = half // max(cell // 2, 1) + 2
        coarse = ndimage.gaussian_filter(rng.standard_normal((coarse_n, coarse_n)), sigma, mode="wrap")
        fine = ndimage.zoom(coarse.astype(np.float32), max(cell // 2, 1), order=1)[:half, :half]
        fine -= fine.mean()
        fine /= fine.std() + 1e-9
        self.half = fine
        self.size = size

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Full-resolution rows ``r0:r1`` (all columns)."""
        part = self.half[r0 // 2: (r1 + 1) // 2 + 1]
        full = np.repeat(np.repeat(part, 2, axis=0), 2, axis=1)
        start = r0 - 2 * (r0 // 2)
        return full[start: start + (r1 - r0), : self.size]


def _hash_uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) float32 per integer key (splitmix64): per-object randomness without np.unique.

    A field or a town block is identified by an integer key; hashing the key gives every pixel
    of the object the same random draw, at the cost of one vectorised pass.
    """
    z = keys.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % 2**64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float32) / np.float32(2**24))


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return x * c + y * s, -x * s + y * c


class _Parcels:
    """Rectangular fields on a rotated cadastre: columns of random width, rows of random length."""

    CROPS = ("crop_winter_cereal", "crop_maize", "crop_sunflower", "crop_rapeseed", "grass", "bare_soil", "shrub")
    SHARES = (0.26, 0.2, 0.12, 0.1, 0.2, 0.05, 0.07)

    def __init__(self, rng: np.random.Generator, grid: CityGrid):
        self.angle = rng.uniform(-0.6, 0.6)
        half = grid.extent_m * 0.75
        widths = rng.uniform(60, 180, size=int(2 * half / 60) + 2)
        self.edges = np.concatenate([[-half], -half + np.cumsum(widths)]).astype(np.float32)
        self.half = half
        self.lengths = rng.uniform(120, 400, size=len(self.edges)).astype(np.float32)
        self.offsets = rng.uniform(0, 400, size=len(self.edges)).astype(np.float32)
        self.salt = int(rng.integers(2**31))
        self.crops = np.array([MATERIAL_ID[n] for n in self.CROPS], dtype=np.uint8)
        self.cumulative = np.cumsum(self.SHARES).astype(np.float32)

    def paint(self, x: np.ndarray, y: np.ndarray, mat: np.ndarray, bright: np.ndarray) -> None:
        u, v = _rotate(x, y, self.angle)
        col = np.clip(np.searchsorted(self.edges, u) - 1, 0, len(self.edges) - 1)
        row = np.floor((v + self.half + self.offsets[col]) / self.lengths[col]).astype(np.int64)
        parcel = col.astype(np.int64) * 100_000 + row
        draw = _hash_uniform(parcel, self.salt) * self.cumulative[-1]
        choice = np.searchsorted(self.cumulative, draw, side="right")
        mat[...] = self.crops[np.minimum(choice, len(self.crops) - 1)]
        bright[...] = 0.85 + 0.3 * _hash_uniform(parcel, self.salt + 1)
        # Field margins and tracks between parcels: thin grass strips on the column edges.
        mat[np.abs(u - self.edges[col]) < 2.0] = MATERIAL_ID["grass"]


class _Woods:
    def __init__(self, rng: np.random.Generator, grid: CityGrid):
        self.woods = NoiseField(rng, grid.size, cell=int(40 / grid.gsd_m), sigma=2.0)
        self.evergreen = NoiseField(rng, grid.size, cell=int(80 / grid.gsd_m), sigma=1.5)

    def paint(self, r0: int, r1: int, mat: np.ndarray, bright: np.ndarray) -> None:
        woods = self.woods.rows(r0, r1) > 1.0
        evergreen = self.evergreen.rows(r0, r1) > 0.8
        mat[woods] = MATERIAL_ID["tree_deciduous"]
        mat[woods & evergreen] = MATERIAL_ID["tree_evergreen"]
        bright[woods] = 1.0


def _meander(rng: np.random.Generator, grid: CityGrid) -> LineString:
    """A river crossing the whole extent west to east with two superposed meanders."""
    half = grid.extent_m / 2 + 200
    t = np.linspace(-half, half, 400)
    amp1, amp2 = rng.uniform(150, 300), rng.uniform(40, 90)
    lam1, lam2 = rng.uniform(1200, 2000), rng.uniform(300, 500)
    ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
    y0 = rng.uniform(-0.3, 0.3) * grid.extent_m
    ys = y0 + amp1 * np.sin(2 * np.pi * t / lam1 + ph1) + amp2 * np.sin(2 * np.pi * t / lam2 + ph2)
    angle = rng.uniform(-0.5, 0.5)
    xs, ys = t * np.cos(angle) - ys * np.sin(angle), t * np.sin(angle) + ys * np.cos(angle)
    return LineString(np.column_stack([xs + grid.cx, ys + grid.cy]))


def _burn(grid: CityGrid, shapes: list, value: int, out: np.ndarray) -> np.ndarray:
    """Rasterize shapely geometries (L93 coordinates) onto the grid; returns the boolean mask."""
    if not shapes:
        return np.zeros(out.shape, dtype=bool)
    mask = rasterize([(g, 1) for g in shapes], out_shape=out.shape, transform=grid.transform,
                     fill=0, dtype="uint8").astype(bool)
    out[mask] = value
    return mask


def _paint_water(rng: np.random.Generator, grid: CityGrid, mat: np.ndarray, bright: np.ndarray) -> None:
    """River with wetland banks (kept where a noise field says so) and two ponds."""
    river = _meander(rng, grid)
    width = rng.uniform(40, 70)
    banks = river.buffer(width / 2 + rng.uniform(15, 30))
    wet = _burn(grid, [banks], MATERIAL_ID["wetland"], mat)
    keep_wet = NoiseField(rng, grid.size, cell=int(50 / grid.gsd_m), sigma=1.5)
    for r0 in range(0, grid.size, STRIP_ROWS):
        r1 = min(r0 + STRIP_ROWS, grid.size)
        drop = wet[r0:r1] & ~(keep_wet.rows(r0, r1) > 0.0)
        mat[r0:r1][drop] = MATERIAL_ID["grass"]
    _burn(grid, [river.buffer(width / 2)], MATERIAL_ID["water"], mat)
    ponds = []
    for _ in range(2):
        px = grid.cx + rng.uniform(-0.4, 0.4) * grid.extent_m
        py = grid.cy + rng.uniform(-0.4, 0.4) * grid.extent_m
        ponds.append(Point(px, py).buffer(rng.uniform(25, 60)))
    _burn(grid, ponds, MATERIAL_ID["water"], mat)
    bright[mat == MATERIAL_ID["water"]] = 1.0


class _Town:
    """Street grid with dense, residential and park blocks, denser towards the centre."""

    def __init__(self, rng: np.random.Generator, grid: CityGrid):
        self.town_radius = grid.extent_m * rng.uniform(0.25, 0.32)
        self.phase = rng.uniform(0, 6, size=2)
        self.angle = rng.uniform(0, np.pi / 2)
        self.block = np.float32(rng.uniform(80, 110))
        self.street = np.float32(12.0)
        self.salt = int(rng.integers(2**31))
        self.courtyard = NoiseField(rng, grid.size, int(10 / grid.gsd_m), 1.0)
        self.gardens = NoiseField(rng, grid.size, int(8 / grid.gsd_m), 1.0)
        self.parks = NoiseField(rng, grid.size, int(15 / grid.gsd_m), 1.0)

    def paint(self, x: np.ndarray, y: np.ndarray, r0: int, r1: int, mat: np.ndarray, bright: np.ndarray,
              water: np.ndarray) -> None:
        radius = np.sqrt(x * x + y * y)
        theta = np.arctan2(y, x)
        wobble = 0.18 * np.sin(3 * theta + self.phase[0]) + 0.1 * np.sin(5 * theta + self.phase[1])
        rel = radius / (self.town_radius * (1 + wobble))  # < 1 inside the town
        u, v = _rotate(x, y, self.angle)
        block, street = self.block, self.street
        bu, bv = np.mod(u, block), np.mod(v, block)
        block_key = (np.floor(u / block).astype(np.int64) + 1000) * 4000 + (np.floor(v / block).astype(np.int64) + 1000)
        r0_, r1_, r2_ = (_hash_uniform(block_key, self.salt + k) for k in range(3))

        in_town = (rel < 1.6) & ~water
        # Dense blocks get rarer with distance; the outer ring is residential among the fields.
        dense = in_town & (rel < 1.0) & (r0_ < 0.75 - 0.4 * rel)
        park = in_town & (rel < 1.2) & ~dense & (r0_ > 0.93)
        residential = in_town & ~dense & ~park & (r0_ < 1.35 - 0.8 * rel)
        is_street = (bu < street) | (bv < street)
        inner_u, inner_v = bu - street, bv - street
        span = block - street
        roof = np.where(r1_ < 0.55, MATERIAL_ID["roof_tile"], MATERIAL_ID["roof_grey"]).astype(np.uint8)

        # Dense blocks: a ring of buildings 14-20 m deep around a green courtyard.
        depth = 14 + 6 * r2_
        ring = np.minimum(np.minimum(inner_u, span - inner_u), np.minimum(inner_v, span - inner_v)) < depth
        m = dense & ~is_street
        mat[m] = np.where(ring[m], roof[m], MATERIAL_ID["grass"])
        mat[m & ~ring & (self.courtyard.rows(r0, r1) > 0.6)] = MATERIAL_ID["tree_deciduous"]

        # Residential: 12 x 10 m houses every 25 m, gardens in between, some garden trees.
        house = (np.mod(inner_u, 25) < 12) & (np.mod(inner_v, 25) < 10) & (inner_u < span - 5) & (inner_v < span - 5)
        lot = np.floor(inner_u / 25) + np.floor(inner_v / 25) + (r1_ * 7).astype(np.int32)
        hroof = np.where(np.mod(lot, 3) == 0, MATERIAL_ID["roof_grey"], MATERIAL_ID["roof_tile"]).astype(np.uint8)
        m = residential & ~is_street
        mat[m] = np.where(house[m], hroof[m], MATERIAL_ID["grass"])
        mat[m & ~house & (self.gardens.rows(r0, r1) > 0.9)] = MATERIAL_ID["tree_deciduous"]

        # Parks: grass with clumps of trees.
        m = park & ~is_street
        mat[m] = np.where(self.parks.rows(r0, r1)[m] > 0.3, MATERIAL_ID["tree_deciduous"], MATERIAL_ID["grass"])

        built = dense | residential | park
        mat[built & is_street] = MATERIAL_ID["road_asphalt"]
        bright[built] = (0.85 + 0.3 * r2_[built]).astype(np.float32)


def _paint_roads(rng: np.random.Generator, grid: CityGrid, mat: np.ndarray) -> None:
    """4 to 6 arterial roads leaving the centre with gentle bends; they cross the river on bridges."""
    roads = []
    n = int(rng.integers(4, 7))
    base = rng.uniform(0, 2 * np.pi)
    for k in range(n):
        heading = base + 2 * np.pi * k / n + rng.uniform(-0.3, 0.3)
        pts = [(grid.cx, grid.cy)]
        x, y = grid.cx, grid.cy
        for _ in range(12):
            heading += rng.uniform(-0.15, 0.15)
            x += 150 * np.cos(heading)
            y += 150 * np.sin(heading)
            pts.append((x, y))
        roads.append(LineString(pts).buffer(rng.uniform(5, 8)))
    _burn(grid, roads, MATERIAL_ID["road_asphalt"], mat)


#: Rows painted at a time: bounds the memory of the per-pixel temporaries (~25 MB per strip,
#: one strip per thread). The map does not depend on it: every pixel is painted on its own.
STRIP_ROWS = 128


def make_ground_truth(rng: np.random.Generator, grid: CityGrid) -> GroundTruth:
    """Build the material map and brightness of one city (see module docstring for the layers)."""
    mat = np.zeros((grid.size, grid.size), dtype=np.uint8)
    bright = np.ones((grid.size, grid.size), dtype=np.float32)
    strips = [(r0, min(r0 + STRIP_ROWS, grid.size)) for r0 in range(0, grid.size, STRIP_ROWS)]
    # The layers' random draws are made here, in order; the strips only read them (threads.py).
    parcels, woods = _Parcels(rng, grid), _Woods(rng, grid)

    def fields_and_woods(strip: tuple[int, int]) -> None:
        r0, r1 = strip
        x, y = grid.coords(r0, r1)
        parcels.paint(x, y, mat[r0:r1], bright[r0:r1])
        woods.paint(r0, r1, mat[r0:r1], bright[r0:r1])

    in_threads(fields_and_woods, strips)
    _paint_water(rng, grid, mat, bright)
    town = _Town(rng, grid)

    def streets_and_blocks(strip: tuple[int, int]) -> None:
        r0, r1 = strip
        x, y = grid.coords(r0, r1)
        town.paint(x, y, r0, r1, mat[r0:r1], bright[r0:r1], mat[r0:r1] == MATERIAL_ID["water"])

    in_threads(streets_and_blocks, strips)
    _paint_roads(rng, grid, mat)
    return GroundTruth(grid=grid, material=mat, brightness=bright)
