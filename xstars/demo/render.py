"""Render sensors from the ground truth: what Sentinel-2, Landsat-8 and the IGN camera would see.

The physics is deliberately simple but every effect a pipeline must cope with is there:

* reflectance = sum over materials of (area fraction x brightness x spectrum(band, day)),
  so the seasons change crops and trees, and each band sees its own contrast;
* the sensor point-spread function (Gaussian, sigma in sensor pixels) and area integration
  onto the sensor's native grid (UTM for satellites, Lambert-93 for the orthophoto);
* a known misregistration: the scene is rendered on its grid shifted by (-dx, -dy), then
  georeferenced on the nominal grid, so a feature truly at X appears at X + (dx, dy);
* clouds with thin edges, their shadows displaced along the sun direction, and noise;
* the products' encodings: Sentinel-2 DN with the baseline-dependent offset, Landsat C2 scale
  and offset, 8-bit orthophotos, and the quality layers (SCL, qa_pixel) consistent with the
  clouds actually rendered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from scipy import ndimage

from xstars.demo.landscape import LAMBERT93, GroundTruth
from xstars.demo.spectra import MATERIALS, material_reflectance
from xstars.demo.threads import in_threads, row_chunks

#: Resolution (m) of the intermediate reflectance grid from which satellite bands are rendered.
FRACTION_GSD_M = 2.5


@dataclass(frozen=True)
class SensorGrid:
    """A north-up grid: CRS, GSD, and the upper-left corner; shape (rows, cols)."""

    crs: str
    gsd_m: float
    xmin: float
    ymax: float
    shape: tuple[int, int]

    @property
    def transform(self) -> Affine:
        return Affine(self.gsd_m, 0.0, self.xmin, 0.0, -self.gsd_m, self.ymax)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.xmin, self.ymax - self.shape[0] * self.gsd_m, self.xmin + self.shape[1] * self.gsd_m, self.ymax)

    def with_gsd(self, gsd_m: float) -> SensorGrid:
        """Same footprint at another resolution (the footprint is a multiple of both GSDs)."""
        rows = round(self.shape[0] * self.gsd_m / gsd_m)
        cols = round(self.shape[1] * self.gsd_m / gsd_m)
        return SensorGrid(self.crs, gsd_m, self.xmin, self.ymax, (rows, cols))


def scene_grid(truth_bounds_l93: tuple[float, float, float, float], crs: str, gsd_m: float,
               snap_m: float = 60.0) -> SensorGrid:
    """The smallest grid in ``crs`` snapped to ``snap_m`` that covers the truth's extent."""
    xmin, ymin, xmax, ymax = transform_bounds(LAMBERT93, crs, *truth_bounds_l93, densify_pts=21)
    xmin, ymin = np.floor(xmin / snap_m) * snap_m, np.floor(ymin / snap_m) * snap_m
    xmax, ymax = np.ceil(xmax / snap_m) * snap_m, np.ceil(ymax / snap_m) * snap_m
    shape = (round((ymax - ymin) / gsd_m), round((xmax - xmin) / gsd_m))
    return SensorGrid(crs, gsd_m, float(xmin), float(ymax), shape)


class FractionCube:
    """Brightness-weighted area fraction of every material on a 2.5 m grid.

    Satellite pixels are >= 10 m, so a band's reflectance at 2.5 m is exact enough and costs
    one small dot product per band instead of a pass over the 0.5 m ground truth.
    """

    def __init__(self, truth: GroundTruth, gsd_m: float = FRACTION_GSD_M):
        factor = round(gsd_m / truth.grid.gsd_m)
        n = truth.grid.size // factor
        n_mat = len(MATERIALS)
        cols = (np.arange(n * factor, dtype=np.int64) // factor)[None, :]
        sums = np.zeros((n, n * n_mat), dtype=np.float64)
        # One row of output cells at a time: bounded memory whatever the city size.
        for i in range(n):
            rows = slice(i * factor, (i + 1) * factor)
            index = cols * n_mat + truth.material[rows, : n * factor]
            sums[i] = np.bincount(index.ravel(), weights=truth.brightness[rows, : n * factor].ravel(),
                                  minlength=n * n_mat)
        self.fractions = (sums.reshape(n, n, n_mat) / factor**2).astype(np.float32)
        self.transform = truth.grid.transform @ Affine.scale(factor)
        self.gsd_m = gsd_m

    def reflectance(self, doy: float, center_um: float, fwhm_um: float) -> np.ndarray:
        return self.fractions @ material_reflectance(doy, center_um, fwhm_um)


def warp_to_grid(src: np.ndarray, src_transform: Affine, grid: SensorGrid, shift_m: tuple[float, float],
                 resampling: Resampling = Resampling.average, src_nodata: float | None = None) -> np.ndarray:
    """Resample a Lambert-93 raster onto ``grid`` displaced by ``-shift_m`` (see module docstring)."""
    dx, dy = shift_m
    true_transform = Affine.translation(-dx, -dy) @ grid.transform
    out = np.full(grid.shape, np.nan, dtype=np.float32)
    reproject(src.astype(np.float32), out, src_transform=src_transform, src_crs=LAMBERT93,
              dst_transform=true_transform, dst_crs=grid.crs, resampling=resampling,
              src_nodata=src_nodata, dst_nodata=np.nan)
    return out


def psf_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian point-spread function (sigma in pixels of ``image``).

    Blurred in bands of rows on ``threads.WORKERS`` threads, each band read with the kernel's
    radius of rows around it: every output pixel sees the same input as in one call, so the
    result is identical to ``ndimage.gaussian_filter`` on the whole image.
    """
    radius = int(4.0 * sigma_px + 0.5) + 1  # SciPy's kernel radius at its default truncate (4 sigma), plus one
    rows = image.shape[0]
    chunks = row_chunks(rows)
    if len(chunks) < 2 or rows < 4 * radius:
        return ndimage.gaussian_filter(image, sigma_px, mode="nearest")
    out = np.empty(image.shape, dtype=image.dtype)

    def blur(chunk: tuple[int, int]) -> None:
        a, b = chunk
        lo, hi = max(a - radius, 0), min(b + radius, rows)
        out[a:b] = ndimage.gaussian_filter(image[lo:hi], sigma_px, mode="nearest")[a - lo: b - lo]

    in_threads(blur, chunks)
    return out


def footprint_mask(cube: FractionCube, grid: SensorGrid, shift_m: tuple[float, float]) -> np.ndarray:
    """True where the sensor pixel lies fully inside the ground truth (elsewhere: no data)."""
    ones = np.ones(cube.fractions.shape[:2], dtype=np.float32)
    cover = warp_to_grid(ones, cube.transform, grid, shift_m, Resampling.average, src_nodata=None)
    return np.nan_to_num(cover) > 0.999


@dataclass(frozen=True)
class CloudField:
    """Cloud optical thickness alpha in [0, 1] and shadow strength in [0, 1] on a scene grid."""

    alpha: np.ndarray
    shadow: np.ndarray

    def at_shape(self, shape: tuple[int, int]) -> CloudField:
        """Nearest-neighbour resize (cloud fields are smooth; bands differ by integer factors)."""
        def fit(a: np.ndarray) -> np.ndarray:
            ry = np.minimum((np.arange(shape[0]) * a.shape[0]) // shape[0], a.shape[0] - 1)
            rx = np.minimum((np.arange(shape[1]) * a.shape[1]) // shape[1], a.shape[1] - 1)
            return a[np.ix_(ry, rx)]
        return CloudField(fit(self.alpha), fit(self.shadow))


def make_clouds(rng: np.random.Generator, shape: tuple[int, int], gsd_m: float, cover_fraction: float,
                sun_azimuth_deg: float, sun_elevation_deg: float, cloud_height_m: float = 600.0) -> CloudField:
    """Cumulus-like clouds covering about ``cover_fraction`` of the scene, with their shadows."""
    if cover_fraction <= 0:
        z = np.zeros(shape, dtype=np.float32)
        return CloudField(z, z.copy())
    cell_px = max(round(300 / gsd_m), 1)
    coarse = rng.standard_normal((shape[0] // cell_px + 3, shape[1] // cell_px + 3))
    field = ndimage.zoom(ndimage.gaussian_filter(coarse, 1.0), cell_px, order=1)[: shape[0], : shape[1]]
    field = field + 0.35 * ndimage.gaussian_filter(rng.standard_normal(field.shape), 1.5)
    threshold = np.quantile(field, 1.0 - cover_fraction)
    alpha = np.clip((field - threshold) / (0.6 * field.std() + 1e-9) + 0.15, 0.0, 1.0).astype(np.float32)
    alpha[field < threshold - 0.15 * field.std()] = 0.0
    # The shadow falls away from the sun: horizontal offset = height / tan(elevation).
    offset_m = cloud_height_m / np.tan(np.radians(sun_elevation_deg))
    az = np.radians(sun_azimuth_deg)
    dx_px = -offset_m * np.sin(az) / gsd_m  # east component, pointing away from the sun
    dy_px = offset_m * np.cos(az) / gsd_m  # rows grow southwards
    shadow = ndimage.shift(alpha, (dy_px, dx_px), order=1, mode="constant", cval=0.0)
    shadow = np.clip(shadow * 1.5, 0.0, 1.0) * (alpha < 0.05)
    return CloudField(alpha, shadow.astype(np.float32))


#: Top-of-cloud reflectance by wavelength (bright and white in the visible, darker in the SWIR).
def cloud_reflectance(center_um: float) -> float:
    return float(np.interp(center_um, [0.4, 0.9, 1.6, 2.2], [0.75, 0.70, 0.45, 0.30]))


def apply_atmosphere(surface: np.ndarray, clouds: CloudField, center_um: float) -> np.ndarray:
    """Darken shadows, blend clouds over the surface."""
    shaded = surface * (1.0 - 0.65 * clouds.shadow)
    return (1.0 - clouds.alpha) * shaded + clouds.alpha * cloud_reflectance(center_um)


def encode_s2(reflectance: np.ndarray, valid: np.ndarray, processing_baseline: str) -> np.ndarray:
    """Sentinel-2 L2A DN: reflectance * 10000, plus 1000 from baseline 04.00 on (BOA_ADD_OFFSET)."""
    offset = 1000.0 if processing_baseline >= "04.00" else 0.0
    # Round first, then add the integer offset: both baselines encode the same rounded value.
    dn = np.clip(np.round(reflectance * 10000.0) + offset, 1, 65535)
    return np.where(valid, dn, 0).astype(np.uint16)


LANDSAT_SR_SCALE, LANDSAT_SR_OFFSET = 2.75e-05, -0.2
LANDSAT_ST_SCALE, LANDSAT_ST_OFFSET = 0.00341802, 149.0


def encode_landsat_sr(reflectance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Landsat Collection 2 surface reflectance DN (valid range 7273..43636, fill 0)."""
    dn = np.clip(np.round((reflectance - LANDSAT_SR_OFFSET) / LANDSAT_SR_SCALE), 7273, 43636)
    return np.where(valid, dn, 0).astype(np.uint16)


def encode_landsat_st(kelvin: np.ndarray, valid: np.ndarray) -> np.ndarray:
    dn = np.clip(np.round((kelvin - LANDSAT_ST_OFFSET) / LANDSAT_ST_SCALE), 1, 65535)
    return np.where(valid, dn, 0).astype(np.uint16)


def s2_scene_classification(clouds: CloudField, red: np.ndarray, nir: np.ndarray, water: np.ndarray,
                            valid: np.ndarray) -> np.ndarray:
    """SCL (20 m) consistent with the rendered clouds: 0 no data, 3 shadow, 4 vegetation,
    5 not vegetated, 6 water, 8/9 cloud medium/high probability, 10 thin cirrus."""
    ndvi = (nir - red) / np.maximum(nir + red, 1e-6)
    scl = np.where(ndvi > 0.35, 4, 5).astype(np.uint8)
    scl[water] = 6
    scl[clouds.shadow > 0.3] = 3
    scl[(clouds.alpha > 0.12) & (clouds.alpha <= 0.35)] = 10
    scl[(clouds.alpha > 0.35) & (clouds.alpha <= 0.65)] = 8
    scl[clouds.alpha > 0.65] = 9
    scl[~valid] = 0
    return scl


def landsat_qa_pixel(clouds: CloudField, water: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """QA_PIXEL bit field: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 shadow, 6 clear, 7 water,
    8-9 cloud confidence, 10-11 shadow confidence, 14-15 cirrus confidence."""
    cloud = clouds.alpha > 0.35
    cirrus = (clouds.alpha > 0.12) & ~cloud
    dilated = ndimage.binary_dilation(cloud, iterations=1) & ~cloud
    shadow = clouds.shadow > 0.3
    qa = np.zeros(valid.shape, dtype=np.uint16)
    qa |= (dilated.astype(np.uint16) << 1) | (cirrus.astype(np.uint16) << 2) | (cloud.astype(np.uint16) << 3)
    qa |= shadow.astype(np.uint16) << 4
    clear = ~(cloud | dilated)
    qa |= clear.astype(np.uint16) << 6
    qa |= ((water & clear).astype(np.uint16)) << 7
    qa |= np.where(cloud, 3, 1).astype(np.uint16) << 8
    qa |= np.where(shadow, 3, 1).astype(np.uint16) << 10
    qa |= np.where(cirrus, 3, 1).astype(np.uint16) << 14
    return np.where(valid, qa, 1).astype(np.uint16)  # fill pixels: bit 0 only


def encode_ortho(reflectance: np.ndarray) -> np.ndarray:
    """8-bit orthophoto radiometry: a gamma stretch like the IGN's colour-balanced mosaics."""
    return np.clip(np.round(255.0 * np.clip(reflectance / 0.45, 0, 1) ** (1 / 1.6)), 1, 255).astype(np.uint8)


def write_cog(path, array: np.ndarray, crs: str, transform: Affine, nodata: float | None,
              blocksize: int = 256, band_descriptions: list[str] | None = None, compress: str = "deflate",
              level: int | None = None) -> None:
    """Write a Cloud-Optimised GeoTIFF (``compress``, deflate unless told, with the horizontal
    predictor; internal tiles, overviews)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array if array.ndim == 3 else array[None]
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
                   "dtype": data.dtype, "crs": crs, "transform": transform, "nodata": nodata}
    with rasterio.MemoryFile() as mem:
        with mem.open(**profile) as tmp:
            tmp.write(data)
            if band_descriptions:
                for i, d in enumerate(band_descriptions, start=1):
                    tmp.set_band_description(i, d)
        with mem.open() as tmp:
            rasterio.shutil.copy(tmp, path, driver="COG", blocksize=blocksize, compress=compress,
                                 predictor=2, overview_resampling="average", num_threads=1,
                                 **({"level": level} if level is not None else {}))
