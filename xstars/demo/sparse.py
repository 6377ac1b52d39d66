"""Full-size product files whose content is only a few rendered pieces: sparse tiled GeoTIFFs.

A real Sentinel-2 band is 10980 px a side; the demo renders only the few kilometres around its
cities. A piece is staged once (a small GeoTIFF at full resolution plus one per overview level,
the levels computed here from the piece alone), and :func:`write_sparse` assembles the product:
a VRT of the full grid places every piece (and, for each overview, its reduced copy) and GDAL's
GTiff driver copies it with ``SPARSE_OK=TRUE`` and ``COPY_SRC_OVERVIEWS=YES``. Blocks no piece
touches are never written (GDAL skips the VRT's holes) and read as nodata, so a 10980 x 10980
file with its internal overviews costs the disk of its content, and no full-size array is ever
held in memory.

Pieces are placed at offsets that are multiples of the largest overview factor, so a piece's
overview is exactly the product's overview over its window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine

_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}


@dataclass(frozen=True)
class Piece:
    """A staged piece: its files (full resolution first, then one per overview factor) and offset."""

    row_off: int
    col_off: int
    shape: tuple[int, int]
    files: tuple[str, ...]


def overview_factors(size_px: int, blocksize: int = 1024, max_levels: int = 5) -> tuple[int, ...]:
    """Powers of two down to about one block, as GDAL's COG driver chooses them (10980 px: 2 to 16)."""
    factors: list[int] = []
    k = 2
    while len(factors) < max_levels and math.ceil(size_px / (k // 2)) > blocksize:
        factors.append(k)
        k *= 2
    return tuple(factors)


def downsample(array: np.ndarray, factor: int, nodata: float, how: str) -> np.ndarray:
    """(bands, h, w) reduced by ``factor``: the mean of the valid pixels ("average", 0 valid: nodata)
    or the centre pixel ("nearest", for class maps and bit fields). Padded with nodata first."""
    b, h, w = array.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.full((b, hp, wp), nodata, dtype=array.dtype)
    padded[:, :h, :w] = array
    if how == "nearest":
        return np.ascontiguousarray(padded[:, factor // 2::factor, factor // 2::factor])
    blocks = padded.reshape(b, hp // factor, factor, wp // factor, factor)
    valid = blocks != nodata
    count = valid.sum(axis=(2, 4))
    total = np.where(valid, blocks, 0).astype(np.float64).sum(axis=(2, 4))
    mean = np.round(total / np.maximum(count, 1))
    return np.where(count > 0, mean, nodata).astype(array.dtype)


def stage_piece(stem: Path, array: np.ndarray, nodata: float, factors: tuple[int, ...], how: str,
                row_off: int, col_off: int) -> Piece:
    """Write a piece and its overviews next to ``stem`` (``stem.tif``, ``stem.o<k>.tif``)."""
    data = array if array.ndim == 3 else array[None]
    if factors and (row_off % factors[-1] or col_off % factors[-1]):
        raise ValueError(f"piece {stem} at ({row_off}, {col_off}) is not aligned on its overviews ({factors[-1]})")
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for factor in (1, *factors):
        level = data if factor == 1 else downsample(data, factor, nodata, how)
        path = stem.with_name(f"{stem.name}.o{factor}.tif")
        with rasterio.open(path, "w", driver="GTiff", width=level.shape[2], height=level.shape[1],
                           count=level.shape[0], dtype=level.dtype, nodata=nodata,
                           transform=Affine.translation(col_off // factor, -row_off // factor)) as dst:
            dst.write(level)
        files.append(str(path))
    return Piece(row_off, col_off, data.shape[1:], tuple(files))


def _vrt(shape: tuple[int, int], count: int, dtype: str, nodata: float, crs: str | None, transform: Affine | None,
         placed: list[tuple[str, int, int, int, int]], overviews: list[str] = ()) -> str:
    """VRT XML of a ``shape`` grid holding ``placed`` sources (file, row, col, rows, cols), clipped to it."""
    head = f'<VRTDataset rasterXSize="{shape[1]}" rasterYSize="{shape[0]}">'
    if crs:
        head += f"<SRS>{escape(crs)}</SRS>"
    if transform is not None:
        t = transform
        head += f"<GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>"
    bands = []
    for band in range(1, count + 1):
        parts = [f'<VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="{band}"><NoDataValue>{nodata:g}</NoDataValue>']
        parts += [f'<Overview><SourceFilename relativeToVRT="0">{escape(o)}</SourceFilename>'
                  f"<SourceBand>{band}</SourceBand></Overview>" for o in overviews]
        for path, row, col, rows, cols in placed:
            rows, cols = min(rows, shape[0] - row), min(cols, shape[1] - col)
            if rows <= 0 or cols <= 0:
                continue
            parts.append(f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(path)}</SourceFilename>'
                         f"<SourceBand>{band}</SourceBand>"
                         f'<SrcRect xOff="0" yOff="0" xSize="{cols}" ySize="{rows}"/>'
                         f'<DstRect xOff="{col}" yOff="{row}" xSize="{cols}" ySize="{rows}"/></SimpleSource>')
        bands.append("".join(parts) + "</VRTRasterBand>")
    return head + "".join(bands) + "</VRTDataset>"


def write_sparse(path: Path, shape: tuple[int, int], count: int, dtype: str, crs: str, transform: Affine,
                 nodata: float, pieces: list[Piece], factors: tuple[int, ...], blocksize: int = 1024) -> None:
    """The full-size tiled, deflated GeoTIFF of ``pieces`` with internal overviews, written sparse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".vrt.d")
    staged.mkdir(exist_ok=True)
    overview_vrts = []
    for i, factor in enumerate(factors, start=1):
        oshape = (-(-shape[0] // factor), -(-shape[1] // factor))
        placed = [(p.files[i], p.row_off // factor, p.col_off // factor, -(-p.shape[0] // factor),
                   -(-p.shape[1] // factor)) for p in pieces]
        ovr = staged / f"o{factor}.vrt"
        ovr.write_text(_vrt(oshape, count, dtype, nodata, None, None, placed))
        overview_vrts.append(str(ovr))
    full = staged / "full.vrt"
    full.write_text(_vrt(shape, count, dtype, nodata, crs, transform,
                         [(p.files[0], p.row_off, p.col_off, *p.shape) for p in pieces], overview_vrts))
    options = {"tiled": True, "blockxsize": blocksize, "blockysize": blocksize, "compress": "deflate",
               "predictor": 2, "sparse_ok": True, "copy_src_overviews": True, "num_threads": 1}
    with rasterio.open(full) as src:
        rasterio.shutil.copy(src, path, driver="GTiff", **options)
    for f in staged.iterdir():
        f.unlink()
    staged.rmdir()
