"""Generate the offline demo world: ground truth, rendered scenes, STAC items, WMS layers.

``generate_world(root, demo_cfg)`` writes the layout described in :mod:`xstars.demo.layout`.
It is deterministic: the same ``demo_cfg`` (seed, cities, extent) gives byte-identical files.

Per city the catalogue holds, on the real tile grids (:mod:`xstars.demo.scenes`, :mod:`xstars.demo.tiling`):

* Sentinel-2 L2A on every MGRS tile holding the city (two in a tile overlap or near a zone
  border), full-size sparse files: 5 acquisitions from the tile's own orbit, one of them (2021)
  twice: at baseline 02.12 and reprocessed at 05.00, as the Planetary Computer serves it;
  baselines 04.00 and 05.09 afterwards; ``platform`` spelled both ways; ``proj:code`` on the 2023
  items, ``proj:epsg`` before; and one from the neighbouring orbit whose swath edge cuts the tile.
* Landsat C2 L2 on every WRS-2 scene holding the city, in the zone of the scene's centre: Tier 1
  and Tier 2, L2SP and L2SR, Landsat-8 and -9.
* ESA WorldCover 2020 v100 and 2021 v200 on the 3-degree tiles the city touches.
* WMS layer families (``xstars/demo/sensors.yaml``, data): IGN orthophotos, two campaign years
  per city, served by the WMS as per-year RGB and IRC layers; each family rendered from the same
  ground truth at its own resolution.

Every scene carries a known misregistration written to ``truth/shifts.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.warp import reproject
from scipy import ndimage

from xstars.demo import layout, scenes, threads
from xstars.demo.items import collection
from xstars.demo.landscape import LAMBERT93, CityGrid, GroundTruth, make_ground_truth
from xstars.demo.render import FractionCube, encode_ortho, psf_blur, write_cog
from xstars.demo.spectra import material_reflectance, material_to_worldcover

log = logging.getLogger(__name__)

WORLD_VERSION = 2  # 2: the products on the real tile grids (MGRS, WRS-2, WorldCover's 3 degrees)

@functools.cache
def wms_families() -> tuple[dict[str, Any], ...]:
    """The demo world's WMS layer families (``xstars/demo/sensors.yaml``)."""
    text = resources.files("xstars.demo").joinpath("sensors.yaml").read_text(encoding="utf-8")
    return tuple(yaml.safe_load(text)["wms_families"])


@dataclass(frozen=True)
class City:
    name: str
    lon: float
    lat: float
    index: int

    def years_of(self, family: Mapping[str, Any]) -> list[int]:
        """The campaign years of a WMS family that cover this city (rotating from city to city)."""
        years = list(family["years"])
        count = min(int(family["years_per_city"]), len(years))
        return sorted({years[(self.index + j * (len(years) - 1)) % len(years)] for j in range(count)})


def _rng(seed: int, city: City, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, city.index, *purpose])


def _shift(rng: np.random.Generator, max_px: float, gsd_m: float) -> tuple[float, float]:
    return scenes.draw_shift(rng, max_px, gsd_m)


def _shift_record(shift: tuple[float, float], gsd_m: float, crs: str, city: City) -> dict[str, Any]:
    return scenes.shift_record(shift, gsd_m, crs, city.name)


def _doy(when: datetime) -> int:
    return when.timetuple().tm_yday


def _city_grid(city: City, extent_m: float, gsd_m: float) -> CityGrid:
    x, y = Transformer.from_crs("EPSG:4326", LAMBERT93, always_xy=True).transform(city.lon, city.lat)
    return CityGrid(city.name, round(x / 10) * 10.0, round(y / 10) * 10.0, float(extent_m), float(gsd_m))


class BackgroundWriter:
    """Runs one write at a time in a thread while the caller goes on; a new write first waits for
    the previous one (so at most one array waits to be written: memory stays bounded)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        """Until the last write is done (its error, if any, raised here)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """The last write done, the thread stopped."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _render_wms_family(root: Path, seed: int, city: City, truth: GroundTruth, shifts: dict[str, Any],
                       texture: np.ndarray, family: Mapping[str, Any], writer: BackgroundWriter) -> list[dict[str, Any]]:
    """A WMS family's sources for one city: per campaign year, one uint8 GeoTIFF in Lambert-93
    with the camera's bands, at the family's resolution, with a known misregistration."""
    camera = {band: tuple(value) for band, value in family["camera"].items()}
    factor = 1 if family["gsd_m"] is None else round(float(family["gsd_m"]) / truth.grid.gsd_m)
    if factor < 1 or abs(factor * truth.grid.gsd_m - float(family["gsd_m"] or truth.grid.gsd_m)) > 1e-9:
        raise ValueError(f"demo WMS family {family['name']}: gsd_m {family['gsd_m']} is not a whole multiple "
                         f"of the ground truth's {truth.grid.gsd_m} m")
    gsd = truth.grid.gsd_m * factor
    size = truth.grid.size // factor
    used = size * factor  # truth pixels under whole output pixels (a 1.5 m family on 0.5 m: a multiple of 3)
    strip = 512 - 512 % factor  # rows of the truth rendered at once (bounded memory), whole output rows
    sources = []
    for year in city.years_of(family):
        acquired = family["acquired"]
        when = (datetime(year, acquired["month"], acquired["day"], 11, 0, tzinfo=UTC)
                + timedelta(days=acquired["days_per_city"] * city.index))
        rng = _rng(seed, city, family["rng"], year)
        shift = _shift(rng, float(family["max_shift_px"]), gsd)
        bands = np.zeros((len(camera), size, size), dtype=np.uint8)
        for b, (center, fwhm) in enumerate(camera.values()):
            lut = material_reflectance(_doy(when), center, fwhm)
            reflectance = np.zeros((size, size), dtype=np.float32) if factor > 1 else None
            for r0 in range(0, used, strip):  # strips: bounded memory
                rows = slice(r0, min(r0 + strip, used))
                refl = lut[truth.material[rows, :used]] * truth.brightness[rows, :used]
                if family["texture"]:
                    refl = refl * texture[rows, :used]
                refl += float(family["noise"]) * rng.standard_normal(refl.shape, dtype=np.float32)
                if factor == 1:
                    bands[b, rows] = encode_ortho(refl)
                else:  # each output pixel averages the ground under it
                    h = refl.shape[0] // factor
                    reflectance[r0 // factor: r0 // factor + h] = refl.reshape(
                        h, factor, size, factor).mean(axis=(1, 3))
            if factor > 1:
                if family["psf_sigma_px"]:
                    reflectance = psf_blur(reflectance, float(family["psf_sigma_px"]))
                bands[b] = encode_ortho(reflectance)
        transform = Affine(gsd, 0.0, truth.grid.transform.c, 0.0, -gsd, truth.grid.transform.f)
        declared = Affine.translation(*shift) @ transform
        path = layout.files_dir(root) / "wms" / family["name"] / str(year) / f"{city.name}.tif"
        # The WMS server's own sources (never fetched by the pipeline as files): zstd at its fastest
        # level, written while the next year is rendered (GDAL works outside the GIL).
        writer.submit(write_cog, path, bands, LAMBERT93, declared, nodata=0, blocksize=512,
                      band_descriptions=list(camera), compress="zstd", level=1)
        layer = family["layers"][0]["name"].format(year=year)
        shifts[f"{layer}/{city.name}"] = _shift_record(shift, gsd, LAMBERT93, city)
        sources.append({"family": family["name"], "year": year, "city": city.name,
                        "acquired": when.date().isoformat(), "path": str(path.relative_to(root))})
    return sources


def _wms_layers(sources: list[dict[str, Any]]) -> dict[str, Any]:
    """Every family's per-year layers, named like the Géoplateforme's, plus their mixed-year mosaics."""
    layers = []
    for family in wms_families():
        mine = [s for s in sources if s["family"] == family["name"]]
        camera = list(family["camera"])
        for year in sorted({s["year"] for s in mine}):
            of_year = [s for s in mine if s["year"] == year]
            dates = ", ".join(f"{s['city']} {s['acquired']}" for s in of_year)
            for layer in family["layers"]:
                layers.append({"name": layer["name"].format(year=year), "title": layer["title"].format(year=year),
                               "abstract": f"{layer['title'].format(year=year)} (demo), prises de vue: {dates}",
                               "year": year, "bands": list(layer["bands"]),
                               "sources": [{"path": s["path"], "acquired": s["acquired"],
                                            "band_indexes": [camera.index(b) + 1 for b in layer["bands"]]}
                                           for s in of_year]})
        mosaic = family.get("mosaic")
        if mosaic:
            latest: dict[str, dict[str, Any]] = {}
            for s in sorted(mine, key=lambda s: s["year"]):
                latest[s["city"]] = s
            layers.append({"name": mosaic["name"], "title": mosaic["title"],
                           "abstract": "Mixed-year mosaic: the latest campaign of each area", "year": None,
                           "bands": list(mosaic["bands"]),
                           "sources": [{"path": s["path"], "acquired": s["acquired"],
                                        "band_indexes": [camera.index(b) + 1 for b in mosaic["bands"]]}
                                       for s in latest.values()]})
    return {"layers": layers}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def cities_from_config(demo_cfg: dict[str, Any]) -> list[City]:
    return [City(c["name"], float(c["lon"]), float(c["lat"]), i) for i, c in enumerate(demo_cfg["cities"])]


def generate_world(root: Path, demo_cfg: dict[str, Any]) -> dict[str, Any]:
    """Generate the whole demo world under ``root``; returns the content of ``world.json``.

    ``demo_cfg`` is the ``demo`` block of the config: ``seed``, ``cities`` (name, lon, lat),
    ``extent_m`` and ``label_gsd_m``. ``world.json`` is written last, so its presence means
    the world is complete (Snakemake uses it as the rule's output).
    """
    root = Path(root)
    seed = int(demo_cfg.get("seed", 0))
    extent_m = float(demo_cfg.get("extent_m", 2560))
    gsd_m = float(demo_cfg.get("label_gsd_m", 0.5))
    layout.world_json(root).unlink(missing_ok=True)
    threads.one_malloc_arena()  # strips on two threads, memory as on one (threads.py)
    started = time.perf_counter()
    shifts: dict[str, Any] = {}
    wms_sources: list[dict[str, Any]] = []
    cities_meta = []
    cities = cities_from_config(demo_cfg)
    extents = [(c.index, c.lon, c.lat, scenes.city_lonlat_bounds(_city_grid(c, extent_m, gsd_m).bounds))
               for c in cities]
    s2_plans, landsat_plans = scenes.plan_s2(extents), scenes.plan_landsat(extents)
    staging = scenes.Staging(root)
    writer = BackgroundWriter()
    for city in cities:
        t0 = time.perf_counter()
        truth = make_ground_truth(_rng(seed, city, 0), _city_grid(city, extent_m, gsd_m))
        labels = material_to_worldcover()[truth.material]
        write_cog(layout.landcover_path(root, city.name), labels, LAMBERT93, truth.grid.transform, nodata=0,
                  blocksize=512)
        cube = FractionCube(truth)
        s2_tiles = scenes.stage_s2(staging, seed, city.index, city.name, truth, cube, s2_plans, shifts)
        path_rows = scenes.stage_landsat(staging, seed, city.index, city.name, truth, cube, landsat_plans, shifts)
        wc_tiles = scenes.stage_worldcover(staging, city.name, truth, labels)
        del cube, labels  # the orthophotos are rendered from the truth alone: memory for their writes
        # Fine texture of the ground (tiles, grass tufts, crop rows) shared by every orthophoto.
        tex_rng = _rng(seed, city, 4)
        texture = ndimage.gaussian_filter(tex_rng.standard_normal(truth.material.shape, dtype=np.float32), 0.8)
        texture *= 0.06 / 0.33
        texture += 1.0
        for family in wms_families():
            wms_sources += _render_wms_family(root, seed, city, truth, shifts, texture, family, writer)
        del truth, texture
        cities_meta.append({"name": city.name, "lon": city.lon, "lat": city.lat, "s2_tiles": s2_tiles,
                            "utm_crs": s2_plans[s2_tiles[0]].tile.crs if s2_tiles else None,
                            "wrs_path_rows": path_rows, "worldcover_tiles": wc_tiles,
                            "wms_years": {f["name"]: city.years_of(f) for f in wms_families()},
                            "bounds_l93": list(_city_grid(city, extent_m, gsd_m).bounds)})
        log.info("demo city=%s seconds=%.1f", city.name, time.perf_counter() - t0)
    writer.close()
    t0 = time.perf_counter()
    staging.write()
    log.info("demo products=%d seconds=%.1f", len(staging.products), time.perf_counter() - t0)
    landsat, mtl = scenes.landsat_items(staging)
    for item_id, text in mtl.items():
        _write_json(layout.files_dir(root) / "landsat-c2-l2" / item_id / "MTL.json", text)
    items = {"sentinel-2-l2a": scenes.s2_items(staging), "landsat-c2-l2": landsat,
             "esa-worldcover": scenes.worldcover_items(staging)}

    stac_dir = layout.items_path(root).parent
    stac_dir.mkdir(parents=True, exist_ok=True)
    all_items = [i for coll in items.values() for i in coll]
    layout.items_path(root).write_text("".join(json.dumps(i, sort_keys=True) + "\n" for i in all_items))
    titles = {"sentinel-2-l2a": "Sentinel-2 Level-2A", "landsat-c2-l2": "Landsat Collection 2 Level-2",
              "esa-worldcover": "ESA WorldCover"}
    _write_json(layout.collections_path(root), [collection(c, titles[c], v) for c, v in items.items()])
    _write_json(layout.wms_layers_path(root), _wms_layers(wms_sources))
    _write_json(layout.shifts_path(root), {
        "convention": "a feature truly at ground coordinate (x, y) appears in the scene, read with its "
                      "declared georeferencing, at (x + dx_m, y + dy_m); correct by subtracting (dx_m, dy_m) "
                      "from the transform offsets. dx_px/dy_px are in the scene's pixels; dy is northwards.",
        "scenes": shifts})
    world = {"version": WORLD_VERSION, "seed": seed, "extent_m": extent_m, "label_gsd_m": gsd_m,
             "cities": cities_meta, "counts": {k: len(v) for k, v in items.items()} | {
                 "wms_sources": len(wms_sources)}}
    _write_json(layout.world_json(root), world)
    log.info("demo world root=%s items=%d seconds=%.1f", root, len(all_items), time.perf_counter() - started)
    return world


def _read_on_footprint(path: Path, bands: list[int], bounds_l93: tuple[float, float, float, float],
                       gsd_m: float, resampling: Resampling = Resampling.nearest) -> np.ndarray:
    """Read bands of a raster onto a Lambert-93 footprint at ``gsd_m`` (declared georeferencing)."""
    xmin, ymin, xmax, ymax = bounds_l93
    shape = (round((ymax - ymin) / gsd_m), round((xmax - xmin) / gsd_m))
    dst_transform = Affine(gsd_m, 0, xmin, 0, -gsd_m, ymax)
    out = np.zeros((len(bands),) + shape, dtype=np.float32)
    with rasterio.open(path) as src:
        for i, b in enumerate(bands):
            reproject(rasterio.band(src, b), out[i], dst_transform=dst_transform, dst_crs=LAMBERT93,
                      resampling=resampling)
    return out


def _stretch(rgb: np.ndarray) -> np.ndarray:
    """2-98 percentile stretch of a (3, H, W) array to an (H, W, 3) image in [0, 1]."""
    valid = rgb[0] > 0
    lo, hi = np.percentile(rgb[:, valid], [2, 98]) if valid.any() else (0.0, 1.0)
    return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1).transpose(1, 2, 0)


def render_preview(root: Path, out: Path, footprint_m: float = 960.0) -> Path:
    """One demo tile seen by the three sensors, with its label map, side by side (PNG).

    Reads the generated files directly with their *declared* georeferencing, so the known
    misregistration is visible as it will be to the pipeline before co-registration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from xstars.demo.spectra import WORLDCOVER_CLASSES, WORLDCOVER_COLOURS

    root, out = Path(root), Path(out)
    world = json.loads(layout.world_json(root).read_text())
    items = [json.loads(line) for line in layout.items_path(root).read_text().splitlines()]
    city = world["cities"][0]
    xmin, ymin, xmax, ymax = city["bounds_l93"]
    cx, cy = (xmin + xmax) / 2 - footprint_m * 0.3, (ymin + ymax) / 2 - footprint_m * 0.2
    bounds = (cx - footprint_m / 2, cy - footprint_m / 2, cx + footprint_m / 2, cy + footprint_m / 2)

    def clearest(collection_id: str, platform_prefix: str) -> dict[str, Any]:
        """The clearest full scene over the city (not an orbit-edge one, not Landsat Tier 2)."""
        mine = [i for i in items if i["collection"] == collection_id
                and i["properties"]["platform"].lower().startswith(platform_prefix)
                and i["properties"].get("s2:nodata_pixel_percentage", 0) < 1
                and i["properties"].get("landsat:collection_category", "T1") == "T1"
                and i["bbox"][0] <= city["lon"] <= i["bbox"][2] and i["bbox"][1] <= city["lat"] <= i["bbox"][3]]
        return min(mine, key=lambda i: (i["properties"]["eo:cloud_cover"], i["id"]))

    def local(href: str) -> Path:
        return layout.local_path(root, href)

    s2 = clearest("sentinel-2-l2a", "sentinel-2")
    l8 = clearest("landsat-c2-l2", "landsat-8")
    panels = []
    family = wms_families()[0]
    year = city["wms_years"][family["name"]][-1]
    ortho = layout.files_dir(root) / "wms" / family["name"] / str(year) / f"{city['name']}.tif"
    rgb = [list(family["camera"]).index(b) + 1 for b in ("R", "G", "B")]
    panels.append((f"{family['layers'][0]['name'].format(year=year)} (1 m)",
                   _stretch(_read_on_footprint(ortho, rgb, bounds, 1.0))))
    s2_rgb = np.concatenate([_read_on_footprint(local(s2["assets"][b]["href"]), [1], bounds, 10.0)
                             for b in ("B04", "B03", "B02")])
    panels.append((f"Sentinel-2 L2A {s2['properties']['datetime'][:10]} (10 m)", _stretch(s2_rgb)))
    l8_rgb = np.concatenate([_read_on_footprint(local(l8["assets"][b]["href"]), [1], bounds, 30.0)
                             for b in ("red", "green", "blue")])
    panels.append((f"Landsat-8 C2 L2 {l8['properties']['datetime'][:10]} (30 m)", _stretch(l8_rgb)))
    labels = _read_on_footprint(layout.landcover_path(root, city["name"]), [1], bounds, 1.0)[0].astype(int)

    codes = sorted(WORLDCOVER_COLOURS)
    lut = np.zeros(256, dtype=int)
    for i, c in enumerate(codes):
        lut[c] = i
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
    axes[3].imshow(lut[labels], cmap=ListedColormap([WORLDCOVER_COLOURS[c] for c in codes]), vmin=0,
                   vmax=len(codes) - 1, interpolation="nearest")
    axes[3].set_title("Ground truth (WorldCover classes, 0.5 m)", fontsize=10)
    present = [c for c in codes if c and (labels == c).any()]
    axes[3].legend(handles=[matplotlib.patches.Patch(color=WORLDCOVER_COLOURS[c], label=WORLDCOVER_CLASSES[c])
                            for c in present], loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"xstars demo world: one {footprint_m:.0f} m tile of '{city['name']}' seen by three sensors "
                 "(declared georeferencing, before co-registration)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
