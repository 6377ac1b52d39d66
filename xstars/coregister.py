"""Co-registration: estimate the residual shift between two images of the same ground.

Phase correlation (Kuglin & Hines 1975) with sub-pixel refinement by a locally upsampled DFT
(Guizar-Sicairos et al. 2008, the method behind ``skimage.registration.phase_cross_correlation``),
written here so that masks (clouds, no data) and a confidence figure are part of the contract:

* masked pixels are replaced by the mean of the valid ones, and a Hann window tapers the
  borders, so clouds and scene edges do not create false correlation peaks;
* the confidence is the height of the normalised phase-correlation peak relative to the
  correlation surface's spread: about 1-3 for unrelated images, >> 5 for a clear match.

Sign convention: ``estimate_shift(reference, moving)`` returns ``(dy, dx)`` in pixels such that
``moving[y, x] ~= reference[y - dy, x - dx]``: the content of ``moving`` is displaced by
``+dy`` rows and ``+dx`` columns relative to ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShiftEstimate:
    """Displacement of ``moving`` relative to ``reference`` in pixels, and how much to trust it."""

    dy: float
    dx: float
    confidence: float
    valid_fraction: float


def _prepare(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill invalid pixels with the valid mean, remove the mean, apply a 2-D Hann window."""
    img = np.asarray(image, dtype=np.float64)
    fill = img[valid].mean() if valid.any() else 0.0
    img = np.where(valid, img, fill) - fill
    wy = np.hanning(img.shape[0])[:, None]
    wx = np.hanning(img.shape[1])[None, :]
    return img * wy * wx


def _upsampled_dft(data: np.ndarray, region: int, factor: float, offsets: np.ndarray) -> np.ndarray:
    """The inverse DFT of ``data`` evaluated on a ``region``-sized grid upsampled by ``factor``."""
    out = data
    for n_items, offset in zip(data.shape[::-1], offsets[::-1]):
        kernel = (np.arange(region) - offset)[:, None] * np.fft.fftfreq(n_items, factor)[None, :]
        out = np.tensordot(np.exp(-2j * np.pi * kernel), out, axes=(1, -1))
    return out


def estimate_shift(reference: np.ndarray, moving: np.ndarray, valid: np.ndarray | None = None,
                   upsample: int = 20) -> ShiftEstimate:
    """Sub-pixel displacement of ``moving`` relative to ``reference`` (same shape).

    ``valid`` marks pixels usable in both images (e.g. cloud-free and not no-data).
    """
    if reference.shape != moving.shape:
        raise ValueError(f"reference {reference.shape} and moving {moving.shape} differ in shape")
    if valid is None:
        valid = np.isfinite(reference) & np.isfinite(moving)
    valid = valid & np.isfinite(reference) & np.isfinite(moving)
    valid_fraction = float(valid.mean())
    if valid_fraction < 0.05:
        return ShiftEstimate(0.0, 0.0, 0.0, valid_fraction)
    ref_f = np.fft.fft2(_prepare(reference, valid))
    mov_f = np.fft.fft2(_prepare(moving, valid))
    product = ref_f * mov_f.conj()
    product /= np.maximum(np.abs(product), 1e-12)
    corr = np.abs(np.fft.ifft2(product))
    peak = np.array(np.unravel_index(np.argmax(corr), corr.shape), dtype=float)
    shape = np.array(corr.shape, dtype=float)
    peak[peak > np.fix(shape / 2)] -= shape[peak > np.fix(shape / 2)]
    confidence = float((corr.max() - corr.mean()) / (corr.std() + 1e-12)) / np.sqrt(corr.size) * 10

    # Refine around the integer peak on a 1.5-pixel window upsampled `upsample` times.
    peak = np.round(peak * upsample) / upsample
    region = int(np.ceil(upsample * 1.5))
    centre = np.fix(region / 2.0)
    fine = np.abs(_upsampled_dft(product.conj(), region, upsample, centre - peak * upsample).conj())
    fine_peak = np.array(np.unravel_index(np.argmax(fine), fine.shape), dtype=float) - centre
    register = peak + fine_peak / upsample  # shift that registers moving onto reference
    return ShiftEstimate(dy=float(-register[0]), dx=float(-register[1]), confidence=confidence,
                         valid_fraction=valid_fraction)


# ============================================================================ a site's sensors


@dataclass(frozen=True)
class ShiftRecord:
    """The co-registration of one sensor of one site onto the reference sensor."""

    sensor: str
    reference: str
    dx_m: float  # estimated displacement of the sensor's content, metres east
    dy_m: float  # ... metres north
    gsd_m: float  # resolution the estimate was made at (the coarser of the pair)
    confidence: float
    valid_fraction: float
    applied: bool
    flag: str  # why it was not applied ("" when applied)


def coregister_site(tiles: dict, config: dict) -> dict[str, ShiftRecord]:
    """Estimate each image sensor's shift against ``build.coregister_reference`` and apply it.

    For a pair, both tiles' ``coregister_band`` is resampled (average) from the windows already
    read onto the footprint grown by ``build.margin_m``, at the coarser of the two resolutions,
    and compared by :func:`estimate_shift` on the pixels valid in both. An estimate is applied
    (the moving sensor re-rendered with its georeferencing corrected) only if its confidence
    reaches ``build.min_confidence`` and it is under ``build.max_shift_px``; otherwise it is
    recorded with the reason and left out. ``tiles`` maps sensor name ->
    :class:`xstars.acquire.SensorTile`, updated in place; labels are never moved.
    """
    from rasterio.enums import Resampling

    from xstars.acquire import render, site_grid

    build = config["build"]
    reference = build["coregister_reference"]
    ref_tile = tiles[reference]
    footprint = ref_tile.grid.bounds
    records = {}
    for name, tile in tiles.items():
        if name == reference or not tile.sensor.is_image:
            continue
        gsd = max(tile.grid.transform.a, ref_tile.grid.transform.a)
        grid = site_grid(footprint, gsd, tile.grid.crs, margin_m=_margin_on(gsd, build["margin_m"]))
        ref_img, ref_valid = _band_on(ref_tile, grid, Resampling.average)
        mov_img, mov_valid = _band_on(tile, grid, Resampling.average)
        estimate = estimate_shift(ref_img, mov_img, ref_valid & mov_valid)
        dx_m, dy_m = estimate.dx * gsd, -estimate.dy * gsd  # rows grow southwards
        flag = ""
        if estimate.confidence < build["min_confidence"]:
            flag = f"low confidence {estimate.confidence:.2f} < {build['min_confidence']:g}"
        elif max(abs(estimate.dx), abs(estimate.dy)) > build["max_shift_px"]:
            flag = f"shift {max(abs(estimate.dx), abs(estimate.dy)):.2f} px > {build['max_shift_px']:g}"
        if not flag:
            tile.shift_m = (dx_m, dy_m)
            tile.data, tile.valid = render(tile.sensor, tile.item, tile.sources, tile.grid, tile.shift_m)
        records[name] = ShiftRecord(name, reference, round(dx_m, 4), round(dy_m, 4), gsd,
                                    round(estimate.confidence, 4), round(estimate.valid_fraction, 4), not flag, flag)
    return records


def _margin_on(gsd: float, margin_m: float) -> float:
    """The margin rounded down to whole pixels of ``gsd``."""
    return float(np.floor(margin_m / gsd) * gsd)


def _band_on(tile, grid, resampling) -> tuple[np.ndarray, np.ndarray]:
    """A tile's ``coregister_band`` resampled from its source windows onto ``grid``, with validity.

    A WMS sensor's margin was read apart, at the coarse resolution it is compared at (its
    ``<layer>_context`` source): that window stands for the layer here.
    """
    from xstars.acquire import context_key, render

    band = tile.sensor.coregister_band
    sources = dict(tile.sources)
    for key in list(sources):
        if context_key(key) in sources:
            sources[key] = sources[context_key(key)]
    data, valid = render(tile.sensor, tile.item, sources, grid, tile.shift_m, resampling, bands=[band])
    return data[0].astype(np.float64), valid
