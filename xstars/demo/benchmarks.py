"""Fake copies of the public benchmarks, in their published layouts, for tests and the demo.

:mod:`xstars.benchmarks` reads users' downloads of EuroSAT, BigEarthNet and FLAIR; these copies
let its readers and the whole ``evaluate`` rule run without them. Each has the real layout's
folders and file names, band count and order, data type, image size, CRS and transform (EuroSAT
and BigEarthNet in UTM, FLAIR in Lambert-93), a few images per class, and a ``xstars-fake.json``
marker so that results say they ran on a fake. The pixels are rendered from the demo world's
material spectra (:mod:`xstars.demo.spectra`), each class a mix of materials in smooth random
patches, so classes differ as they would on the ground and the probes have something to find.

    xstars demo benchmarks --out demo_world/benchmarks
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from scipy import ndimage

from xstars.benchmarks import BIGEARTHNET_BANDS, EUROSAT_BANDS, EUROSAT_CLASSES, FAKE_MARKER
from xstars.demo.items import S2_BANDS
from xstars.demo.render import encode_ortho
from xstars.demo.spectra import MATERIAL_ID, material_reflectance
from xstars.errors import DataError

#: Sentinel-2 band centre and width (um); B10 (cirrus) is not among the demo world's L2A bands.
S2_CENTRES = {band: (centre, fwhm) for band, (_, _, centre, fwhm, _) in S2_BANDS.items()} | {"B10": (1.375, 0.021)}
#: Bands in atmospheric absorption lines: the share of the surface signal that reaches the sensor.
S2_ABSORPTION = {"B09": 0.35, "B10": 0.02}
IGN_CENTRES = {"R": (0.64, 0.08), "G": (0.55, 0.08), "B": (0.46, 0.08), "NIR": (0.84, 0.12)}
LAMBERT93 = "EPSG:2154"

EUROSAT_RECIPES: dict[str, dict[str, float]] = {
    "AnnualCrop": {"crop_winter_cereal": 1.0, "crop_maize": 1.0, "bare_soil": 0.5},
    "Forest": {"tree_deciduous": 1.0, "tree_evergreen": 1.0},
    "HerbaceousVegetation": {"grass": 1.0, "shrub": 1.0},
    "Highway": {"road_asphalt": 1.0, "grass": 1.5},
    "Industrial": {"roof_grey": 1.5, "road_asphalt": 1.0},
    "Pasture": {"grass": 2.0, "tree_deciduous": 0.2},
    "PermanentCrop": {"shrub": 1.0, "bare_soil": 1.0},
    "Residential": {"roof_tile": 1.0, "grass": 0.7, "tree_deciduous": 0.5},
    "River": {"water": 1.0, "tree_deciduous": 1.0, "grass": 1.0},
    "SeaLake": {"water": 3.0},
}

#: The 19-class labels the fakes use: their materials, and a CORINE level-3 name (v1's labels).
BIGEARTHNET_RECIPES: dict[str, tuple[tuple[str, ...], str]] = {
    "Urban fabric": (("roof_tile", "road_asphalt"), "Discontinuous urban fabric"),
    "Industrial or commercial units": (("roof_grey",), "Industrial or commercial units"),
    "Arable land": (("crop_winter_cereal", "crop_maize"), "Non-irrigated arable land"),
    "Pastures": (("grass",), "Pastures"),
    "Broad-leaved forest": (("tree_deciduous",), "Broad-leaved forest"),
    "Coniferous forest": (("tree_evergreen",), "Coniferous forest"),
    "Inland waters": (("water",), "Water bodies"),
    "Inland wetlands": (("wetland",), "Peatbogs"),
}

#: FLAIR zones (a recipe of materials each) and the mask value of every material.
FLAIR_RECIPES: dict[str, dict[str, float]] = {
    "urban": {"roof_tile": 1.0, "roof_grey": 0.6, "road_asphalt": 0.8, "grass": 0.6, "tree_deciduous": 0.4},
    "natural": {"tree_deciduous": 1.0, "tree_evergreen": 0.8, "shrub": 0.6, "grass": 0.6, "water": 0.4},
    "agricultural": {"crop_winter_cereal": 1.0, "crop_maize": 0.8, "bare_soil": 0.5, "grass": 0.5},
}
FLAIR_CODES = {"roof_tile": 1, "roof_grey": 1, "road_asphalt": 3, "bare_soil": 4, "water": 5, "tree_evergreen": 6,
               "tree_deciduous": 7, "shrub": 8, "grass": 10, "crop_winter_cereal": 11, "crop_maize": 11}
#: Height above ground (m) of each material, for FLAIR's elevation band.
HEIGHT_M = {"roof_tile": 9.0, "roof_grey": 12.0, "tree_deciduous": 15.0, "tree_evergreen": 18.0, "shrub": 2.0}


# ================================================================================== scenes


def material_map(rng: np.random.Generator, px: int, recipe: Mapping[str, float], cells: int = 6) -> np.ndarray:
    """[px, px] material ids: the recipe's materials in smooth random patches of relative areas
    following its weights (the largest smooth field, biased by log-weight, wins each pixel)."""
    names = list(recipe)
    fields = np.stack([ndimage.zoom(rng.standard_normal((cells, cells)), px / cells, order=1)[:px, :px]
                       + np.log(recipe[n]) for n in names])
    return np.array([MATERIAL_ID[n] for n in names])[fields.argmax(axis=0)]


def reflectance(rng: np.random.Generator, materials: np.ndarray, bands: Mapping[str, tuple[float, float]],
                doy: float) -> np.ndarray:
    """[bands, H, W] surface reflectance of a material map, with a common texture and sensor noise."""
    texture = 1.0 + 0.08 * ndimage.gaussian_filter(rng.standard_normal(materials.shape), 1.5)
    out = np.empty((len(bands), *materials.shape), dtype=np.float32)
    for b, (centre, fwhm) in enumerate(bands.values()):
        out[b] = material_reflectance(doy, centre, fwhm)[materials] * texture
    return out + 0.004 * rng.standard_normal(out.shape).astype(np.float32)


def s2_l1c(rng: np.random.Generator, materials: np.ndarray, bands: Sequence[str], doy: float) -> np.ndarray:
    """Top-of-atmosphere reflectance: the surface's, absorbed in the water-vapour and cirrus bands,
    plus a path radiance that falls with wavelength."""
    surface = reflectance(rng, materials, {b: S2_CENTRES[b] for b in bands}, doy)
    for b, band in enumerate(bands):
        centre = S2_CENTRES[band][0]
        surface[b] = surface[b] * S2_ABSORPTION.get(band, 1.0) + 0.06 * (0.443 / centre) ** 4
    return surface


def _dn(reflectance: np.ndarray) -> np.ndarray:
    return np.clip(np.round(reflectance * 10000), 1, 65535).astype(np.uint16)


def _write(path: Path, data: np.ndarray, crs: str, transform: Affine, descriptions: Sequence[str] | None = None,
           nodata: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data if data.ndim == 3 else data[None]
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, compress="deflate") as dst:
        dst.write(data)
        for i, name in enumerate(descriptions or (), start=1):
            dst.set_band_description(i, name)


def _mark(root: Path, layout: str, seed: int, counts: Mapping[str, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / FAKE_MARKER).write_text(json.dumps({"generator": "xstars demo benchmarks", "layout": layout, "seed": seed,
                                                "counts": dict(counts)}, indent=1) + "\n")


# =============================================================================== layouts


def write_eurosat_ms(root: Path, seed: int = 0, per_class: int = 4) -> Path:
    """``root/EuroSAT_MS/<Class>/<Class>_<n>.tif`` (as EuroSAT_MS.zip unpacks): 13 uint16 bands in
    the files' order (B8A last), L1C reflectance x 10^4, 64 x 64 px of 10 m in a UTM zone."""
    folder = root / "EuroSAT_MS"
    for k, name in enumerate(EUROSAT_CLASSES):
        for n in range(1, per_class + 1):
            rng = np.random.default_rng([seed, 11, k, n])
            zone = int(rng.integers(29, 34))
            x0, y0 = float(rng.integers(300, 700)) * 1000, float(rng.integers(4800, 6000)) * 1000
            data = s2_l1c(rng, material_map(rng, 64, EUROSAT_RECIPES[name], cells=4), EUROSAT_BANDS,
                          float(rng.uniform(120, 260)))
            _write(folder / name / f"{name}_{n}.tif", _dn(data), f"EPSG:326{zone}", Affine(10, 0, x0, 0, -10, y0))
    _mark(root, "eurosat_ms", seed, {"classes": len(EUROSAT_CLASSES), "per_class": per_class})
    return folder


def _bigearthnet_patches(seed: int, count: int) -> list[dict[str, Any]]:
    """The fakes' patches: 1 to 3 labels each from the recipes, a row/col on a UTM tile."""
    labels = list(BIGEARTHNET_RECIPES)
    patches = []
    for i in range(count):
        rng = np.random.default_rng([seed, 13, i])
        chosen = sorted(rng.choice(len(labels), size=int(rng.integers(1, 4)), replace=False).tolist())
        patches.append({"row": 10 + i // 4, "col": 20 + i % 4, "labels": [labels[j] for j in chosen],
                        "split": "test" if i % 4 == 3 else "val" if i % 8 == 6 else "train"})
    return patches


def _write_bigearthnet_bands(folder: Path, name: str, rng: np.random.Generator, labels: Sequence[str], crs: str,
                             x0: float, y0: float) -> None:
    """One GeoTIFF per band at its own resolution (120, 60 or 20 px over the 1.2 km patch)."""
    recipe = {m: 1.0 for label in labels for m in BIGEARTHNET_RECIPES[label][0]}
    surface = reflectance(rng, material_map(rng, 120, recipe, cells=5), {b: S2_CENTRES[b] for b in BIGEARTHNET_BANDS},
                          float(rng.uniform(150, 250)))
    for b, band in enumerate(BIGEARTHNET_BANDS):
        px = {10: 120, 20: 60, 60: 20}[S2_BANDS[band][4]]
        block = 120 // px
        data = surface[b].reshape(px, block, px, block).mean(axis=(1, 3))
        _write(folder / f"{name}_{band}.tif", _dn(data), crs, Affine(1200 / px, 0, x0, 0, -1200 / px, y0))


def write_bigearthnet_v1(root: Path, seed: int = 0, patches: int = 16) -> Path:
    """``root/BigEarthNet-v1.0/<patch>/<patch>_<band>.tif`` + ``<patch>_labels_metadata.json`` (43-class
    names), and the official split lists ``train.csv``, ``val.csv``, ``test.csv`` beside it. One more
    patch carries only a class outside the 19-class nomenclature (readers leave it out)."""
    crs = rasterio.crs.CRS.from_epsg(32633)
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, patch in enumerate(_bigearthnet_patches(seed, patches) + [{"row": 99, "col": 99, "labels": [],
                                                                      "split": None}]):
        rng = np.random.default_rng([seed, 17, i])
        product = ("S2A_MSIL2A_20170613T101031", "S2B_MSIL2A_20170924T093019")[i % 2]
        name = f"{product}_{patch['row']}_{patch['col']}"
        x0, y0 = 300000.0 + 1200 * patch["col"], 5900040.0 - 1200 * patch["row"]
        corine = [BIGEARTHNET_RECIPES[label][1] for label in patch["labels"]]
        if i == 0:
            corine.append("Road and rail networks and associated land")  # no 19-class counterpart
        folder = root / "BigEarthNet-v1.0" / name
        _write_bigearthnet_bands(folder, name, rng, patch["labels"] or ["Pastures"], crs.to_string(), x0, y0)
        metadata = {"labels": corine or ["Green urban areas"],
                    "coordinates": {"ulx": x0, "uly": y0, "lrx": x0 + 1200, "lry": y0 - 1200},
                    "projection": crs.to_wkt(), "tile_source": f"{product.replace('L2A', 'L1C')}_N0205_R022_T33UUP.SAFE",
                    "acquisition_date": f"{product[11:15]}-{product[15:17]}-{product[17:19]} "
                                        f"{product[20:22]}:{product[22:24]}:{product[24:26]}"}
        (folder / f"{name}_labels_metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
        if patch["split"]:
            lists[patch["split"]].append(name)
    for split, names in lists.items():
        (root / f"{split}.csv").write_text("".join(f"{n}\n" for n in names))
    _mark(root, "bigearthnet_v1", seed, {"patches": patches + 1})
    return root


def write_bigearthnet_v2(root: Path, seed: int = 0, patches: int = 16) -> Path:
    """``root/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_<band>.tif`` and ``root/metadata.parquet``
    (patch_id, labels, split, country, s1_name, s2v1_name, contains_seasonal_snow,
    contains_cloud_or_shadow), as the reBEN archives unpack."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list[Any]] = {k: [] for k in ("patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                                                  "contains_seasonal_snow", "contains_cloud_or_shadow")}
    for i, patch in enumerate(_bigearthnet_patches(seed + 1, patches)):
        rng = np.random.default_rng([seed, 19, i])
        tile, epsg = (("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", 32633),
                      ("S2B_MSIL2A_20170615T102019_N9999_R122_T32TNS", 32632))[i % 2]
        patch_id = f"{tile}_{patch['row']}_{patch['col']}"
        x0, y0 = 300000.0 + 1200 * patch["col"], 5200020.0 - 1200 * patch["row"]
        _write_bigearthnet_bands(root / "BigEarthNet-S2" / tile / patch_id, patch_id, rng, patch["labels"],
                                 f"EPSG:{epsg}", x0, y0)
        for key, value in (("patch_id", patch_id), ("labels", sorted(patch["labels"])),
                           ("split", {"val": "validation"}.get(patch["split"], patch["split"])),
                           ("country", ("Austria", "Switzerland")[i % 2]),
                           ("s1_name", f"S1A_IW_GRDH_1SDV_20170613T165043_{tile[-5:]}_{patch['row']}_{patch['col']}"),
                           ("s2v1_name", f"{tile[:26]}_{patch['row']}_{patch['col']}"),
                           ("contains_seasonal_snow", False), ("contains_cloud_or_shadow", False)):
            rows[key].append(value)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), root / "metadata.parquet")
    _mark(root, "bigearthnet_v2", seed, {"patches": patches})
    return root


def write_flair(root: Path, seed: int = 0, per_zone: int = 1) -> Path:
    """FLAIR #1's unpacked archives: ``flair_aerial_train`` / ``flair_labels_train`` and
    ``flair_1_aerial_test`` / ``flair_1_labels_test``, each ``<domain>/<zone>/img/IMG_<n>.tif`` (R, G,
    B, NIR, elevation; uint8, 512 px of 0.2 m, Lambert-93) with ``<domain>/<zone>/msk/MSK_<n>.tif``
    (uint8 values 1..19: swimming pools (13) and greenhouses (18) among them)."""
    domains = {"train": {"D004_2021": ("Z1_UN", "Z8_NF"), "D006_2020": ("Z2_NN", "Z10_UA")},
               "test": {"D012_2019": ("Z3_UA", "Z5_NU")}}
    kinds = {"U": "urban", "N": "natural", "A": "agricultural", "F": "natural"}
    number = 1000
    for split, zones_by_domain in domains.items():
        aerial, labels = ("flair_aerial_train", "flair_labels_train") if split == "train" else \
            ("flair_1_aerial_test", "flair_1_labels_test")
        for d, (domain, zones) in enumerate(zones_by_domain.items()):
            for z, zone in enumerate(zones):
                for _ in range(per_zone):
                    number += 1
                    rng = np.random.default_rng([seed, 23, number])
                    kind = kinds[zone.split("_")[1][z % 2]]
                    materials = material_map(rng, 512, FLAIR_RECIPES[kind], cells=8)
                    image, mask = _flair_patch(rng, materials, kind, float(rng.uniform(120, 240)))
                    x0 = 650000.0 + 40000 * d + 2000 * z + float(rng.integers(0, 20)) * 102.4
                    y0 = 6300000.0 + 50000 * d + float(rng.integers(0, 20)) * 102.4
                    transform = Affine(0.2, 0, x0, 0, -0.2, y0)
                    _write(root / aerial / domain / zone / "img" / f"IMG_{number:06d}.tif", image, LAMBERT93, transform)
                    _write(root / labels / domain / zone / "msk" / f"MSK_{number:06d}.tif", mask, LAMBERT93, transform)
    _mark(root, "flair", seed, {"patches": number - 1000})
    return root


def _lookup(values: Mapping[str, float], dtype) -> np.ndarray:
    """Material id -> value (0 for the materials ``values`` does not name)."""
    table = np.zeros(max(MATERIAL_ID.values()) + 1, dtype=dtype)
    for name, value in values.items():
        table[MATERIAL_ID[name]] = value
    return table


def _flair_patch(rng: np.random.Generator, materials: np.ndarray, kind: str, doy: float) -> tuple[np.ndarray, np.ndarray]:
    mask = _lookup(FLAIR_CODES, np.uint8)[materials]
    for _ in range(3 if kind != "natural" else 0):  # a few rare classes, merged into "other" by readers
        r, c = rng.integers(0, 480, size=2)
        pool = kind == "urban"
        materials[r:r + 24, c:c + 32] = MATERIAL_ID["water" if pool else "roof_grey"]
        mask[r:r + 24, c:c + 32] = 13 if pool else 18
    bands = np.empty((5, 512, 512), dtype=np.uint8)
    bands[:4] = encode_ortho(reflectance(rng, materials, IGN_CENTRES, doy))
    height = _lookup(HEIGHT_M, np.float32)[materials]
    bands[4] = np.clip(np.round(ndimage.gaussian_filter(height, 3) * 5), 0, 255)  # 20 cm steps
    return bands, mask


def write_class_folders(root: Path, seed: int = 0, per_class: int = 6) -> Path:
    """A generic ``<class>/*.tif`` folder: 4 uint16 bands named in the files (B02 B03 B04 B08)."""
    recipes = {"crop": EUROSAT_RECIPES["AnnualCrop"], "forest": EUROSAT_RECIPES["Forest"],
               "urban": EUROSAT_RECIPES["Residential"]}
    bands = ("B02", "B03", "B04", "B08")
    for k, (name, recipe) in enumerate(recipes.items()):
        for n in range(per_class):
            rng = np.random.default_rng([seed, 29, k, n])
            data = reflectance(rng, material_map(rng, 32, recipe, cells=3), {b: S2_CENTRES[b] for b in bands}, 180.0)
            _write(root / name / f"{name}_{n:03d}.tif", _dn(data), "EPSG:32631",
                   Affine(10, 0, 500000.0 + 320 * n, 0, -10, 4800000.0 + 320 * k), bands)
    _mark(root, "class_folders", seed, {"classes": len(recipes), "per_class": per_class})
    return root


def write_image_mask_pairs(root: Path, seed: int = 0, train: int = 6, test: int = 3) -> Path:
    """A generic segmentation copy: ``train/`` and ``test/`` with ``images/<name>.tif`` (R G B NIR,
    uint8, 1 m, Lambert-93) and ``masks/<name>.tif`` (1 building, 2 tree, 3 grass, 4 water; 0 unknown)."""
    recipe = {"roof_tile": 1.0, "tree_deciduous": 1.0, "grass": 1.0, "water": 0.6}
    values = _lookup({"roof_tile": 1, "tree_deciduous": 2, "grass": 3, "water": 4}, np.uint8)
    for split, count in (("train", train), ("test", test)):
        for n in range(count):
            rng = np.random.default_rng([seed, 31, split == "test", n])
            materials = material_map(rng, 64, recipe, cells=4)
            mask = values[materials]
            mask[:4] = 0  # an unlabelled strip
            transform = Affine(1, 0, 800000.0 + 64 * n, 0, -1, 6500000.0 + 64 * (split == "test"))
            _write(root / split / "images" / f"tile_{n:03d}.tif", encode_ortho(reflectance(rng, materials, IGN_CENTRES,
                                                                                           170.0)),
                   LAMBERT93, transform, tuple(IGN_CENTRES))
            _write(root / split / "masks" / f"tile_{n:03d}.tif", mask, LAMBERT93, transform)
    _mark(root, "image_mask_pairs", seed, {"train": train, "test": test})
    return root


WRITERS = {"eurosat_ms": ("eurosat", write_eurosat_ms), "bigearthnet_v1": ("bigearthnet-v1", write_bigearthnet_v1),
           "bigearthnet_v2": ("bigearthnet-v2", write_bigearthnet_v2), "flair": ("flair", write_flair),
           "class_folders": ("class-folders", write_class_folders),
           "image_mask_pairs": ("image-mask-pairs", write_image_mask_pairs)}


def write_benchmarks(out: Path, seed: int = 0, layouts: Sequence[str] | None = None) -> dict[str, str]:
    """Every fake copy (or those of ``layouts``) under ``out``; returns layout -> the path a config
    points at, also written to ``out/benchmarks.json``."""
    import shutil

    out = Path(out)
    paths = {}
    for layout in layouts or WRITERS:
        folder, write = WRITERS[layout]
        root = out / folder
        if root.exists():  # a previous copy: replaced whole, so that no stale file stays
            if not (root / FAKE_MARKER).is_file():
                raise DataError(f"{root} exists and is not a fake copy (no {FAKE_MARKER}): not overwriting it")
            shutil.rmtree(root)
        paths[layout] = str(write(root, seed))
    (out / "benchmarks.json").write_text(json.dumps(paths, indent=1) + "\n")
    return paths
