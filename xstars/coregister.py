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
