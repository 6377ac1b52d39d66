"""Surface materials of the demo world: reflectance spectra, phenology and land-cover class.

Every pixel of the ground truth is one *material* (a red-tile roof, a maize parcel, a river...).
Each material belongs to an ESA WorldCover class (the label) and has a reflectance spectrum
that, for vegetation, moves through the year between a green canopy and its background (bare
soil for crops, dry litter for grass and deciduous trees). Sensors integrate these spectra over
their own bands, so Sentinel-2, Landsat-8 and the IGN camera see one consistent world.

The spectra are typical values read off published libraries (USGS splib07, ECOSTRESS/ASTER) at
the sensors' band centres; they are meant to be realistic in shape and magnitude (red edge,
water absorption in the NIR and SWIR, bright tile roofs in the red), not to reproduce a
particular sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Wavelengths (micrometres) at which every spectrum below is tabulated.
WAVELENGTHS_UM = np.array([0.443, 0.490, 0.560, 0.665, 0.705, 0.740, 0.783, 0.842, 0.865, 1.610, 2.190])

_GREEN_CROP = [0.025, 0.035, 0.078, 0.035, 0.12, 0.31, 0.41, 0.45, 0.46, 0.24, 0.11]
_GREEN_GRASS = [0.030, 0.040, 0.080, 0.050, 0.13, 0.29, 0.37, 0.40, 0.41, 0.25, 0.13]
_DECIDUOUS = [0.025, 0.033, 0.070, 0.035, 0.11, 0.28, 0.36, 0.40, 0.41, 0.20, 0.09]
_CONIFER = [0.020, 0.025, 0.050, 0.025, 0.08, 0.18, 0.24, 0.27, 0.28, 0.14, 0.06]
_SHRUB = [0.040, 0.050, 0.080, 0.070, 0.13, 0.22, 0.27, 0.30, 0.31, 0.28, 0.17]
_RAPESEED_FLOWER = [0.040, 0.050, 0.160, 0.120, 0.20, 0.33, 0.40, 0.43, 0.44, 0.26, 0.13]
_DRY_VEG = [0.050, 0.060, 0.090, 0.120, 0.15, 0.20, 0.23, 0.25, 0.26, 0.33, 0.24]
_SOIL = [0.070, 0.090, 0.130, 0.180, 0.21, 0.23, 0.25, 0.27, 0.28, 0.36, 0.31]
_ASPHALT = [0.060, 0.070, 0.080, 0.090, 0.095, 0.10, 0.105, 0.11, 0.11, 0.13, 0.12]
_ROOF_TILE = [0.070, 0.080, 0.110, 0.250, 0.30, 0.32, 0.33, 0.34, 0.34, 0.40, 0.35]
_ROOF_GREY = [0.150, 0.170, 0.190, 0.200, 0.21, 0.21, 0.22, 0.22, 0.22, 0.24, 0.22]
_WATER = [0.070, 0.065, 0.060, 0.035, 0.025, 0.018, 0.014, 0.012, 0.011, 0.005, 0.003]
_WETLAND = [0.045, 0.050, 0.070, 0.045, 0.08, 0.16, 0.20, 0.22, 0.22, 0.11, 0.05]

#: ESA WorldCover class codes and names (https://esa-worldcover.org, product v200).
WORLDCOVER_CLASSES: dict[int, str] = {
    10: "Tree cover",
    20: "Shrubland",
    30: "Grassland",
    40: "Cropland",
    50: "Built-up",
    60: "Bare / sparse vegetation",
    70: "Snow and ice",
    80: "Permanent water bodies",
    90: "Herbaceous wetland",
    95: "Mangroves",
    100: "Moss and lichen",
}

#: Colours of the official WorldCover legend, for figures.
WORLDCOVER_COLOURS: dict[int, str] = {
    0: "#000000", 10: "#006400", 20: "#ffbb22", 30: "#ffff4c", 40: "#f096ff", 50: "#fa0000",
    60: "#b4b4b4", 70: "#f0f0f0", 80: "#0064c8", 90: "#0096a0", 95: "#00cf75", 100: "#fae6a0",
}


@dataclass(frozen=True)
class Phenology:
    """Green-canopy fraction over the year: ``g_min + (g_max - g_min) * bump(day of year)``.

    ``bump`` is a wrapped Gaussian centred on ``peak_doy`` with ``width_days`` standard deviation.
    """

    g_min: float
    g_max: float
    peak_doy: float
    width_days: float

    def green_fraction(self, doy: float) -> float:
        delta = (doy - self.peak_doy + 182.5) % 365.0 - 182.5
        return self.g_min + (self.g_max - self.g_min) * float(np.exp(-0.5 * (delta / self.width_days) ** 2))


@dataclass(frozen=True)
class Material:
    """One surface material: its label class, green and background spectra, and phenology."""

    name: str
    worldcover: int
    green: tuple[float, ...]
    background: tuple[float, ...]
    phenology: Phenology | None = None
    #: Spectrum mixed in around ``peak_doy`` (rapeseed's yellow flowers), with its weight.
    flower: tuple[float, ...] | None = None

    def spectrum(self, doy: float) -> np.ndarray:
        """Reflectance at :data:`WAVELENGTHS_UM` on day-of-year ``doy``."""
        green = np.asarray(self.green)
        if self.phenology is None:
            return green.copy()
        g = self.phenology.green_fraction(doy)
        out = g * green + (1.0 - g) * np.asarray(self.background)
        if self.flower is not None:
            bloom = Phenology(0.0, 0.6, self.phenology.peak_doy - 10, 12).green_fraction(doy)
            out = (1 - bloom) * out + bloom * np.asarray(self.flower)
        return out


_EVERGREEN = Phenology(0.95, 1.0, 180, 60)

#: Material id (index, 0 = no data) -> material. The order is part of the world's definition:
#: changing it changes every generated file.
MATERIALS: list[Material | None] = [
    None,
    Material("tree_deciduous", 10, tuple(_DECIDUOUS), tuple(_DRY_VEG), Phenology(0.25, 1.0, 190, 70)),
    Material("tree_evergreen", 10, tuple(_CONIFER), tuple(_CONIFER), _EVERGREEN),
    Material("shrub", 20, tuple(_SHRUB), tuple(_DRY_VEG), Phenology(0.5, 0.9, 150, 60)),
    Material("grass", 30, tuple(_GREEN_GRASS), tuple(_DRY_VEG), Phenology(0.45, 0.95, 135, 55)),
    Material("crop_winter_cereal", 40, tuple(_GREEN_CROP), tuple(_SOIL), Phenology(0.05, 0.95, 115, 35)),
    Material("crop_maize", 40, tuple(_GREEN_CROP), tuple(_SOIL), Phenology(0.0, 0.95, 215, 28)),
    Material("crop_sunflower", 40, tuple(_GREEN_CROP), tuple(_SOIL), Phenology(0.0, 0.9, 190, 25)),
    Material("crop_rapeseed", 40, tuple(_GREEN_CROP), tuple(_SOIL), Phenology(0.1, 0.9, 105, 40),
             flower=tuple(_RAPESEED_FLOWER)),
    Material("road_asphalt", 50, tuple(_ASPHALT), tuple(_ASPHALT)),
    Material("roof_tile", 50, tuple(_ROOF_TILE), tuple(_ROOF_TILE)),
    Material("roof_grey", 50, tuple(_ROOF_GREY), tuple(_ROOF_GREY)),
    Material("bare_soil", 60, tuple(_SOIL), tuple(_SOIL)),
    Material("water", 80, tuple(_WATER), tuple(_WATER)),
    Material("wetland", 90, tuple(_WETLAND), tuple(_WATER), Phenology(0.5, 1.0, 170, 60)),
]

MATERIAL_ID: dict[str, int] = {m.name: i for i, m in enumerate(MATERIALS) if m is not None}


def material_to_worldcover() -> np.ndarray:
    """Lookup table: material id -> WorldCover class code (0 for no data)."""
    return np.array([0 if m is None else m.worldcover for m in MATERIALS], dtype=np.uint8)


def band_response(center_um: float, fwhm_um: float) -> np.ndarray:
    """Weights over :data:`WAVELENGTHS_UM` approximating a band of given centre and width.

    Spectra are tabulated at a few wavelengths, so a band is the linear interpolation at a few
    points across its width (centre +- fwhm/2), averaged: enough to separate broad camera bands
    from narrow satellite bands.
    """
    points = np.linspace(center_um - fwhm_um / 2, center_um + fwhm_um / 2, 5)
    weights = np.zeros(len(WAVELENGTHS_UM))
    for p in points:
        j = int(np.clip(np.searchsorted(WAVELENGTHS_UM, p), 1, len(WAVELENGTHS_UM) - 1))
        lo, hi = WAVELENGTHS_UM[j - 1], WAVELENGTHS_UM[j]
        t = float(np.clip((p - lo) / (hi - lo), 0.0, 1.0))
        weights[j - 1] += (1 - t) / len(points)
        weights[j] += t / len(points)
    return weights


def material_reflectance(doy: float, center_um: float, fwhm_um: float) -> np.ndarray:
    """Reflectance of every material (indexed by material id) in one band on one day."""
    weights = band_response(center_um, fwhm_um)
    out = np.zeros(len(MATERIALS), dtype=np.float32)
    for i, m in enumerate(MATERIALS):
        if m is not None:
            out[i] = float(weights @ m.spectrum(doy))
    return out
