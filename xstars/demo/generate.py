"""Generate the offline demo world: ground truth, rendered scenes, STAC items, WMS layers.

``generate_world(root, demo_cfg)`` writes the layout described in :mod:`xstars.demo.layout`.
It is deterministic: the same ``demo_cfg`` (seed, cities, extent) gives byte-identical files.

Per city the catalogue holds (dates shifted by a few days from one city to the next):

* Sentinel-2 L2A: 5 acquisitions, one of them (2021) twice: at baseline 02.12 and reprocessed
  at 05.00, as the Planetary Computer serves it; baselines 04.00 and 05.09 afterwards;
  ``platform`` spelled both ways; ``proj:code`` on the 2023 items, ``proj:epsg`` before.
* Landsat C2 L2: three Landsat-8 and one Landsat-9 acquisitions.
* ESA WorldCover 2021: the label map at 10 m (EPSG:4326).
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
from collections.abc import Mapping
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
from rasterio.warp import reproject, transform_bounds
from scipy import ndimage

from xstars.demo import layout
from xstars.demo.items import (
    LANDSAT_BANDS,
    S2_BANDS,
    LandsatAcquisition,
    S2Acquisition,
    collection,
    landsat_item,
    s2_item,
    worldcover_item,
)
from xstars.demo.landscape import LAMBERT93, CityGrid, GroundTruth, make_ground_truth
from xstars.demo.render import (
    FractionCube,
    SensorGrid,
    apply_atmosphere,
    encode_landsat_sr,
    encode_landsat_st,
    encode_ortho,
    encode_s2,
    footprint_mask,
    landsat_qa_pixel,
    make_clouds,
    psf_blur,
    s2_scene_classification,
    scene_grid,
    warp_to_grid,
    write_cog,
)
from xstars.demo.spectra import MATERIAL_ID, material_reflectance, material_to_worldcover

log = logging.getLogger(__name__)

WORLD_VERSION = 1

#: Sentinel-2 schedule: (date, time, platform, baselines (reprocessings), cloud fraction, proj key).
S2_SCHEDULE = [
    ("2021-07-12", "10:56:21", "Sentinel-2A", ("02.12", "05.00"), 0.04, "proj:epsg"),
    ("2022-04-18", "10:50:39", "Sentinel-2B", ("04.00",), 0.25, "proj:epsg"),
    ("2022-08-16", "10:56:29", "sentinel-2a", ("04.00",), 0.01, "proj:epsg"),
    ("2023-06-11", "10:50:41", "sentinel-2b", ("05.09",), 0.10, "proj:code"),
    ("2023-10-04", "10:56:31", "Sentinel-2A", ("05.09",), 0.60, "proj:code"),
]
#: Generation time of each processing baseline (the reprocessing campaign of 2023 for 05.00).
REPROCESSING_TIME = {"05.00": datetime(2023, 2, 10, 8, 12, 33, tzinfo=UTC)}

#: Landsat schedule: (date, time, platform, cloud fraction).
LANDSAT_SCHEDULE = [
    ("2021-08-03", "10:41:12", "landsat-8", 0.03),
    ("2022-07-21", "10:41:40", "landsat-8", 0.30),
    ("2022-09-07", "10:42:01", "landsat-9", 0.05),
    ("2023-05-20", "10:41:55", "landsat-8", 0.08),
]

S2_PSF_SIGMA_PX, LANDSAT_PSF_SIGMA_PX = 0.45, 0.5
MAX_SHIFT_PX = {"sentinel-2-l2a": 1.5, "landsat-c2-l2": 1.0}


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

    @property
    def utm_crs(self) -> str:
        return f"EPSG:{32600 + int((self.lon + 180) // 6) + 1}"

    @property
    def mgrs_tile(self) -> str:
        """Zone + latitude band + a 100 km square; the square letters are illustrative."""
        zone = int((self.lon + 180) // 6) + 1
        band = "CDEFGHJKLMNPQRSTUVWX"[int((self.lat + 80) // 8)]
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return f"{zone}{band}{letters[(int(self.lon * 10) % 24)]}{letters[(int(self.lat * 10) % 20)]}"

    @property
    def wrs(self) -> tuple[int, int]:
        """Approximate Landsat WRS-2 path/row over France."""
        return round(198 - (self.lon - 1.5) / 1.35), round(30 - (self.lat - 43.6) / 1.4)

    def years_of(self, family: Mapping[str, Any]) -> list[int]:
        """The campaign years of a WMS family that cover this city (rotating from city to city)."""
        years = list(family["years"])
        count = min(int(family["years_per_city"]), len(years))
        return sorted({years[(self.index + j * (len(years) - 1)) % len(years)] for j in range(count)})


def _rng(seed: int, city: City, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, city.index, *purpose])


def _sun(lat: float, when: datetime) -> tuple[float, float]:
    """(azimuth, elevation) in degrees at about 10:50 solar time: enough for shadows."""
    doy = when.timetuple().tm_yday
    declination = 23.44 * np.sin(2 * np.pi * (doy - 81) / 365.0)
    elevation = 90.0 - lat + declination - 8.0
    return 152.0, round(float(elevation), 3)


def _shift(rng: np.random.Generator, max_px: float, gsd_m: float) -> tuple[float, float]:
    """A known misregistration of up to ``max_px`` pixels, at least 0.2 px in norm."""
    while True:
        dx, dy = rng.uniform(-max_px, max_px, size=2)
        if np.hypot(dx, dy) >= 0.2:
            return round(float(dx) * gsd_m, 3), round(float(dy) * gsd_m, 3)


def _doy(when: datetime) -> int:
    return when.timetuple().tm_yday


def _city_grid(city: City, extent_m: float, gsd_m: float) -> CityGrid:
    x, y = Transformer.from_crs("EPSG:4326", LAMBERT93, always_xy=True).transform(city.lon, city.lat)
    return CityGrid(city.name, round(x / 10) * 10.0, round(y / 10) * 10.0, float(extent_m), float(gsd_m))


def _material_fraction(cube: FractionCube, truth: GroundTruth, name: str) -> np.ndarray:
    """Unweighted area fraction of one material on the cube grid (brightness is 1 for water)."""
    return cube.fractions[..., MATERIAL_ID[name]]


def _render_band(cube: FractionCube, doy: int, center: float, fwhm: float, grid: SensorGrid,
                 shift: tuple[float, float], psf_sigma_px: float) -> np.ndarray:
    """Surface reflectance of one band on the sensor grid (PSF applied on the fine grid)."""
    surface = cube.reflectance(doy, center, fwhm)
    surface = psf_blur(surface, psf_sigma_px * grid.gsd_m / cube.gsd_m)
    return np.nan_to_num(warp_to_grid(surface, cube.transform, grid, shift))


def _scl_percentages(scl: np.ndarray) -> dict[str, float]:
    total = scl.size
    valid = np.count_nonzero(scl)
    def pct(*codes: int) -> float:
        return 100.0 * np.isin(scl, codes).sum() / max(valid, 1)
    return {"cloud": pct(8, 9, 10), "cloud_high": pct(9), "cloud_medium": pct(8), "cirrus": pct(10),
            "shadow": pct(3), "vegetation": pct(4), "not_vegetated": pct(5), "water": pct(6),
            "nodata": 100.0 * (total - valid) / total}


def _render_s2(root: Path, seed: int, city: City, truth: GroundTruth, cube: FractionCube,
               shifts: dict[str, Any]) -> list[dict[str, Any]]:
    items = []
    grid10 = scene_grid(truth.grid.bounds, city.utm_crs, 10.0)
    water_frac = _material_fraction(cube, truth, "water")
    for k, (day, clock, platform, baselines, cover, proj_key) in enumerate(S2_SCHEDULE):
        when = datetime.fromisoformat(f"{day}T{clock}+00:00") + timedelta(days=city.index * 3)
        rng = _rng(seed, city, 1, k)
        shift = _shift(rng, MAX_SHIFT_PX["sentinel-2-l2a"], 10.0)
        sun = _sun(city.lat, when)
        grid20 = grid10.with_gsd(20.0)
        clouds20 = make_clouds(rng, grid20.shape, 20.0, cover, *sun)
        refl: dict[str, np.ndarray] = {}
        valid: dict[int, np.ndarray] = {}
        for band, (_, _, center, fwhm, gsd) in S2_BANDS.items():
            grid = grid10.with_gsd(gsd)
            if gsd not in valid:
                valid[gsd] = footprint_mask(cube, grid, shift)
            surface = _render_band(cube, _doy(when), center, fwhm, grid, shift, S2_PSF_SIGMA_PX)
            toa = apply_atmosphere(surface, clouds20.at_shape(grid.shape), center)
            refl[band] = toa + rng.normal(0.0, 0.004, size=toa.shape).astype(np.float32)
        red20 = _render_band(cube, _doy(when), 0.665, 0.038, grid20, shift, S2_PSF_SIGMA_PX)
        water20 = np.nan_to_num(warp_to_grid(water_frac, cube.transform, grid20, shift)) > 0.5
        scl = s2_scene_classification(clouds20, apply_atmosphere(red20, clouds20, 0.665), refl["B8A"],
                                      water20, valid[20])
        percentages = _scl_percentages(scl)
        for baseline in baselines:
            gen_time = REPROCESSING_TIME.get(baseline, when + timedelta(hours=2, minutes=34, seconds=17))
            acq = S2Acquisition(when, platform, baseline, gen_time, city.mgrs_tile, 51 + 43 * city.index, proj_key)
            out = layout.files_dir(root) / "sentinel-2-l2a" / acq.item_id
            for band, (_, _, _, _, gsd) in S2_BANDS.items():
                grid = grid10.with_gsd(gsd)
                write_cog(out / f"{band}.tif", encode_s2(refl[band], valid[gsd], baseline), grid.crs,
                          grid.transform, nodata=0, blocksize=128)
            write_cog(out / "SCL.tif", scl, grid20.crs, grid20.transform, nodata=0, blocksize=128)
            tci = np.stack([np.clip(refl[b] * 1275.0, 0, 255) for b in ("B04", "B03", "B02")]).astype(np.uint8)
            tci[:, ~valid[10]] = 0
            write_cog(out / "visual.tif", tci, grid10.crs, grid10.transform, nodata=0, blocksize=128)
            items.append(s2_item(acq, grid10, truth.grid.bounds, percentages, sun))
            shifts[f"sentinel-2-l2a/{acq.item_id}"] = _shift_record(shift, 10.0, grid10.crs, city)
    return items


def _shift_record(shift: tuple[float, float], gsd_m: float, crs: str, city: City) -> dict[str, Any]:
    return {"dx_m": shift[0], "dy_m": shift[1], "gsd_m": gsd_m, "dx_px": round(shift[0] / gsd_m, 4),
            "dy_px": round(shift[1] / gsd_m, 4), "crs": crs, "city": city.name}


def _render_landsat(root: Path, seed: int, city: City, truth: GroundTruth, cube: FractionCube,
                    shifts: dict[str, Any]) -> list[dict[str, Any]]:
    items = []
    grid30 = scene_grid(truth.grid.bounds, city.utm_crs, 30.0, snap_m=30.0)
    water_frac = _material_fraction(cube, truth, "water")
    built = sum(cube.fractions[..., MATERIAL_ID[n]] for n in ("road_asphalt", "roof_tile", "roof_grey"))
    for k, (day, clock, platform, cover) in enumerate(LANDSAT_SCHEDULE):
        when = datetime.fromisoformat(f"{day}T{clock}+00:00") + timedelta(days=city.index * 2)
        acq = LandsatAcquisition(when, platform, *city.wrs, when + timedelta(days=9))
        rng = _rng(seed, city, 2, k)
        shift = _shift(rng, MAX_SHIFT_PX["landsat-c2-l2"], 30.0)
        sun = _sun(city.lat, when)
        valid = footprint_mask(cube, grid30, shift)
        clouds = make_clouds(rng, grid30.shape, 30.0, cover, *sun)
        out = layout.files_dir(root) / "landsat-c2-l2" / acq.item_id
        for band, (_, _, center, fwhm, _) in LANDSAT_BANDS.items():
            surface = _render_band(cube, _doy(when), center, fwhm, grid30, shift, LANDSAT_PSF_SIGMA_PX)
            toa = apply_atmosphere(surface, clouds, center) + rng.normal(0, 0.005, size=surface.shape)
            write_cog(out / f"{band}.tif", encode_landsat_sr(toa, valid), grid30.crs, grid30.transform,
                      nodata=0, blocksize=128)
        # Surface temperature: seasonal base, warmer built-up, cooler water; clouds are cold.
        season = np.sin(2 * np.pi * (_doy(when) - 110) / 365.0)
        kelvin_fine = 288.0 + 10.0 * season + 8.0 * built - 6.0 * water_frac
        kelvin = np.nan_to_num(warp_to_grid(kelvin_fine.astype(np.float32), cube.transform, grid30, shift))
        kelvin = kelvin * (1 - clouds.alpha) + 255.0 * clouds.alpha
        write_cog(out / "lwir11.tif", encode_landsat_st(kelvin, valid), grid30.crs, grid30.transform,
                  nodata=0, blocksize=128)
        water = np.nan_to_num(warp_to_grid(water_frac, cube.transform, grid30, shift)) > 0.5
        write_cog(out / "qa_pixel.tif", landsat_qa_pixel(clouds, water, valid), grid30.crs, grid30.transform,
                  nodata=1, blocksize=128)
        cloud_cover = 100.0 * float(((clouds.alpha > 0.35) & valid).sum()) / max(int(valid.sum()), 1)
        (out / "MTL.json").write_text(json.dumps({"LANDSAT_METADATA_FILE": {
            "PRODUCT_CONTENTS": {"LANDSAT_PRODUCT_ID": acq.item_id, "PROCESSING_LEVEL": "L2SP"},
            "LEVEL2_SURFACE_REFLECTANCE_PARAMETERS": {"REFLECTANCE_MULT_BAND_4": "2.75E-05",
                                                      "REFLECTANCE_ADD_BAND_4": "-0.200000"},
            "IMAGE_ATTRIBUTES": {"CLOUD_COVER": f"{cloud_cover:.2f}", "SUN_AZIMUTH": sun[0],
                                 "SUN_ELEVATION": sun[1]}}}, indent=1))
        items.append(landsat_item(acq, grid30, truth.grid.bounds, cloud_cover, sun))
        shifts[f"landsat-c2-l2/{acq.item_id}"] = _shift_record(shift, 30.0, grid30.crs, city)
    return items


def _worldcover(root: Path, city: City, truth: GroundTruth, labels: np.ndarray) -> dict[str, Any]:
    """ESA WorldCover-like 10 m labels on the product's own grid (EPSG:4326, 1/12000 degree)."""
    step = 1.0 / 12000.0
    west, south, east, north = transform_bounds(LAMBERT93, "EPSG:4326", *truth.grid.bounds, densify_pts=21)
    west, south = np.floor(west / step) * step, np.floor(south / step) * step
    east, north = np.ceil(east / step) * step, np.ceil(north / step) * step
    grid = SensorGrid("EPSG:4326", step, float(west), float(north),
                      (round((north - south) / step), round((east - west) / step)))
    out = np.zeros(grid.shape, dtype=np.uint8)
    reproject(labels, out, src_transform=truth.grid.transform, src_crs=LAMBERT93, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=Resampling.mode, src_nodata=0, dst_nodata=0)
    lat_tile, lon_tile = int(np.floor(city.lat / 3) * 3), int(np.floor(city.lon / 3) * 3)
    tile = f"{'N' if lat_tile >= 0 else 'S'}{abs(lat_tile):02d}{'E' if lon_tile >= 0 else 'W'}{abs(lon_tile):03d}"
    item_id = f"ESA_WorldCover_10m_2021_v200_{tile}"
    item = worldcover_item(item_id, grid, truth.grid.bounds, 2021)
    write_cog(layout.files_dir(root) / "esa-worldcover" / item_id / "map.tif", out, grid.crs, grid.transform,
              nodata=0, blocksize=128)
    return item


def _render_wms_family(root: Path, seed: int, city: City, truth: GroundTruth, shifts: dict[str, Any],
                       texture: np.ndarray, family: Mapping[str, Any]) -> list[dict[str, Any]]:
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
        write_cog(path, bands, LAMBERT93, declared, nodata=0, blocksize=512, band_descriptions=list(camera))
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
    started = time.perf_counter()
    items: dict[str, list[dict[str, Any]]] = {"sentinel-2-l2a": [], "landsat-c2-l2": [], "esa-worldcover": []}
    shifts: dict[str, Any] = {}
    wms_sources: list[dict[str, Any]] = []
    cities_meta = []
    for city in cities_from_config(demo_cfg):
        t0 = time.perf_counter()
        truth = make_ground_truth(_rng(seed, city, 0), _city_grid(city, extent_m, gsd_m))
        labels = material_to_worldcover()[truth.material]
        write_cog(layout.landcover_path(root, city.name), labels, LAMBERT93, truth.grid.transform, nodata=0,
                  blocksize=512)
        cube = FractionCube(truth)
        items["sentinel-2-l2a"] += _render_s2(root, seed, city, truth, cube, shifts)
        items["landsat-c2-l2"] += _render_landsat(root, seed, city, truth, cube, shifts)
        items["esa-worldcover"].append(_worldcover(root, city, truth, labels))
        # Fine texture of the ground (tiles, grass tufts, crop rows) shared by every orthophoto.
        tex_rng = _rng(seed, city, 4)
        texture = ndimage.gaussian_filter(tex_rng.standard_normal(truth.material.shape, dtype=np.float32), 0.8)
        texture *= 0.06 / 0.33
        texture += 1.0
        for family in wms_families():
            wms_sources += _render_wms_family(root, seed, city, truth, shifts, texture, family)
        del truth, cube, texture, labels
        cities_meta.append({"name": city.name, "lon": city.lon, "lat": city.lat, "utm_crs": city.utm_crs,
                            "mgrs_tile": city.mgrs_tile, "wrs_path_row": list(city.wrs),
                            "wms_years": {f["name"]: city.years_of(f) for f in wms_families()},
                            "bounds_l93": list(_city_grid(city, extent_m, gsd_m).bounds)})
        log.info("demo city=%s seconds=%.1f", city.name, time.perf_counter() - t0)

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
        mine = [i for i in items if i["collection"] == collection_id
                and i["properties"]["platform"].lower().startswith(platform_prefix)
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
