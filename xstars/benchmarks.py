"""Public benchmarks, read in the layouts their users download, evaluated like the store's tasks.

A researcher compares models on published benchmarks, so ``evaluate.benchmarks`` names them
(``layout``) with the path of the user's own copy; nothing is downloaded here. One reader per
layout turns a copy into samples (an id, the layout's split, a target) and reads each image in
physical units with its bands named as the layout documents them:

* ``eurosat_ms``: EuroSAT multispectral (Helber et al. 2019): ``<Class>/<Class>_<n>.tif``, 13
  Sentinel-2 L1C bands in the order B01..B12 then B8A (phelber/EuroSAT#7, torchgeo#2458),
  64 x 64 px at 10 m, 10 classes, no official split (torchgeo's split lists are read if given);
* ``bigearthnet_v1``: BigEarthNet-S2 v1.0: one folder per patch, one GeoTIFF per band at its
  native 10/20/60 m (120/60/20 px), labels in ``<patch>_labels_metadata.json`` (43 CORINE classes,
  mapped to the 19-class nomenclature of Sumbul et al. 2021), splits from the official CSVs;
* ``bigearthnet_v2``: reBEN / BigEarthNet v2.0: ``BigEarthNet-S2/<tile>/<patch>/<patch>_<band>.tif``
  and ``metadata.parquet`` (19-class labels, the official ``train/validation/test`` split);
* ``flair``: FLAIR #1/#2 aerial (IGN): ``<aerial>/<domain>/<zone>/img/IMG_<n>.tif`` (R, G, B,
  NIR, elevation, 8-bit, 512 px at 0.2 m, Lambert-93) and ``<labels>/<domain>/<zone>/msk/MSK_<n>.tif``,
  the 13 classes of the challenge (values above 12 merged into "other"), train vs test folders;
* ``class_folders``: any ``<class>/*.tif`` folder (the generic form of EuroSAT);
* ``image_mask_pairs``: ``images/<name>.tif`` with ``masks/<name>.tif`` (the generic form of FLAIR).

The generic layouts take the band names, units and classes from the config; optional ``train/``
and ``test/`` subfolders are their split. A benchmark's bands are matched to the model sensor's
bands by name (those the model lacks are dropped and recorded, a model band the benchmark lacks
refuses the mapping), its images are resampled to the sensor's ground sampling or kept at their
own (``resolution``), normalised with the model's statistics, embedded, and probed with
:mod:`xstars.probes` for every probe seed and label fraction: k-NN and linear probe
(classification), linear probe mAP (multi-label), a linear head on the patch tokens (segmentation).

A copy written by :mod:`xstars.demo.benchmarks` carries a ``xstars-fake.json`` marker: its rows
are marked as fakes in the results.
"""

from __future__ import annotations

import abc
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from xstars.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NO_LABEL = 255  # as xstars.probes: pixels without a class, ignored by every metric
FAKE_MARKER = "xstars-fake.json"
SPLITS = ("train", "val", "test")

# ============================================================================ layout facts

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")
#: Band order of the EuroSAT_MS GeoTIFFs: B8A is the 13th band, not the 9th.
EUROSAT_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
#: Where the class folders sit: EuroSAT_MS.zip (Zenodo 7711810) and EuroSATallBands.zip.
EUROSAT_FOLDERS = ("", "EuroSAT_MS", "ds/images/remote_sensing/otherDatasets/sentinel_2/tif")

BIGEARTHNET_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: The 19-class nomenclature (Sumbul et al., BigEarthNet-MM), in its published order.
BIGEARTHNET_CLASSES = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters",
)
#: v1's 43 CORINE level-3 names -> the 19 classes; the 11 classes left out have no 19-class label.
CLC43_TO_19 = {
    "Continuous urban fabric": "Urban fabric", "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Non-irrigated arable land": "Arable land", "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land", "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops", "Olive groves": "Permanent crops",
    "Annual crops associated with permanent crops": "Permanent crops", "Pastures": "Pastures",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas", "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest", "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands", "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands", "Salt marshes": "Coastal wetlands", "Salines": "Coastal wetlands",
    "Water courses": "Inland waters", "Water bodies": "Inland waters", "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters", "Sea and ocean": "Marine waters",
}
CLC43_WITHOUT_19 = ("Road and rail networks and associated land", "Port areas", "Airports",
                    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
                    "Sport and leisure facilities", "Bare rock", "Burnt areas", "Intertidal flats")

FLAIR_BANDS = ("R", "G", "B", "NIR", "elevation")
#: The challenge's 13 classes: mask values 1..12, and every value above 12 merged into "other".
FLAIR_CLASSES = ("building", "pervious surface", "impervious surface", "bare soil", "water", "coniferous",
                 "deciduous", "brushwood", "vineyard", "herbaceous vegetation", "agricultural land",
                 "plowed land", "other")

#: Options only the generic layouts read (the named ones know their bands, units and classes).
GENERIC_OPTIONS = ("bands", "scale_factor", "add_offset", "gsd_m", "classes", "ignore_values")


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark: its id, the layout's split (None where it has none), its target
    (class index; tuple of class indices for multi-label; None for segmentation) and its files."""

    id: str
    split: str | None
    target: Any
    files: tuple[Path, ...]


# ================================================================================= readers


class Reader(abc.ABC):
    """A benchmark copy: ``samples``, band names in read order, classes, native ground sampling."""

    layout: ClassVar[str]
    title: ClassVar[str]
    task: ClassVar[str]  # classification | multilabel | segmentation
    expected: ClassVar[str]  # the layout, in words, for the error on a wrong folder

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.path = Path(spec["path"])
        self.bands: tuple[str, ...] = ()
        self.classes: tuple[str, ...] = ()
        self.samples: list[Sample] = []
        self.gsd_m = 0.0
        self.crs = ""

    @abc.abstractmethod
    def read_image(self, sample: Sample) -> np.ndarray:
        """[bands, H, W] float32 in physical units (reflectance), NaN where the file has no data."""

    def read_mask(self, sample: Sample) -> np.ndarray:
        """[H, W] class index, NO_LABEL where no class (segmentation layouts only)."""
        raise DataError(f"{self.layout}: a classification layout has no masks (sample {sample.id})")

    @property
    def fake(self) -> bool:
        return any((p / FAKE_MARKER).is_file() for p in (self.path, self.path.parent))

    def wrong_folder(self, detail: str) -> DataError:
        return DataError(f"evaluate.benchmarks {self.spec['name']} (layout {self.layout}): {detail}; "
                         f"expected {self.title}: {self.expected}")

    def _georeference(self, path: Path) -> None:
        """Ground sampling and CRS from one file (the layouts' images share them)."""
        import rasterio

        with rasterio.open(path) as src:
            self.crs = src.crs.to_string() if src.crs else ""
            projected = bool(src.crs and src.crs.is_projected)
            self.gsd_m = float(self.spec.get("gsd_m") or (abs(src.transform.a) if projected else 0.0))
        if self.gsd_m <= 0:
            raise DataError(f"{path}: no projected CRS, so no ground sampling in metres "
                            f"(set evaluate.benchmarks {self.spec['name']}.gsd_m)")


class EuroSATMS(Reader):
    layout, title, task = "eurosat_ms", "EuroSAT (multispectral)", "classification"
    expected = (f"the class folders {', '.join(EUROSAT_CLASSES)} holding <Class>/<Class>_<n>.tif (13 bands "
                f"{' '.join(EUROSAT_BANDS)}, 64 x 64 px), in the folder itself, in its EuroSAT_MS folder "
                f"(EuroSAT_MS.zip) or in {EUROSAT_FOLDERS[2]} (EuroSATallBands.zip)")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        root = next((self.path / sub for sub in EUROSAT_FOLDERS
                     if all((self.path / sub / c).is_dir() for c in EUROSAT_CLASSES)), None)
        if root is None:
            present = [c for c in EUROSAT_CLASSES if (self.path / c).is_dir()]
            raise self.wrong_folder(f"{self.path} has {'only ' + ', '.join(present) if present else 'no class folder'}")
        self.bands, self.classes = EUROSAT_BANDS, EUROSAT_CLASSES
        splits = _split_lists(self, ("eurosat-{}.txt",))
        for k, name in enumerate(EUROSAT_CLASSES):
            for path in sorted((root / name).glob("*.tif")):
                self.samples.append(Sample(path.stem, splits.get(path.stem) if splits else None, k, (path,)))
        if not self.samples:
            raise self.wrong_folder(f"no GeoTIFF in the class folders of {root}")
        self._georeference(self.samples[0].files[0])

    def read_image(self, sample: Sample) -> np.ndarray:
        # L1C top-of-atmosphere reflectance x 10^4; acquired 2017-2018, before processing
        # baseline 04.00 introduced the -1000 offset.
        return _read_bands(sample.files[0], len(EUROSAT_BANDS)) * np.float32(1e-4)


class BigEarthNetV1(Reader):
    layout, title, task = "bigearthnet_v1", "BigEarthNet-S2 v1.0", "multilabel"
    expected = ("BigEarthNet-v1.0/<patch>/<patch>_<band>.tif for the bands " + " ".join(BIGEARTHNET_BANDS)
                + " and <patch>_labels_metadata.json (the folder BigEarthNet-S2-v1.0.tar.gz unpacks to, or its "
                "parent), with the split lists train.csv, val.csv, test.csv beside it")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        root = self.path / "BigEarthNet-v1.0" if (self.path / "BigEarthNet-v1.0").is_dir() else self.path
        patches = sorted(p for p in root.iterdir() if (p / f"{p.name}_labels_metadata.json").is_file()) \
            if root.is_dir() else []
        if not patches:
            raise self.wrong_folder(f"no patch folder with its _labels_metadata.json in {root}")
        self.bands, self.classes = BIGEARTHNET_BANDS, BIGEARTHNET_CLASSES
        splits = _split_lists(self, ("{}.csv", "bigearthnet-{}.csv"), root.parent)
        index = {c: k for k, c in enumerate(BIGEARTHNET_CLASSES)}
        unlabelled = 0
        for patch in patches:
            names = json.loads((patch / f"{patch.name}_labels_metadata.json").read_text())["labels"]
            unknown = [n for n in names if n not in CLC43_TO_19 and n not in CLC43_WITHOUT_19]
            if unknown:
                raise DataError(f"{patch}: labels {unknown} are not CORINE level-3 names of BigEarthNet")
            target = tuple(sorted({index[CLC43_TO_19[n]] for n in names if n in CLC43_TO_19}))
            if not target:
                unlabelled += 1  # only classes outside the 19-class nomenclature
                continue
            split = splits.get(patch.name) if splits else None
            if splits and split is None:
                continue  # the official lists leave out the cloudy and snowy patches
            self.samples.append(Sample(patch.name, split, target,
                                       tuple(patch / f"{patch.name}_{b}.tif" for b in BIGEARTHNET_BANDS)))
        if unlabelled:
            log.info("%s: %d patches without a 19-class label left out", spec["name"], unlabelled)
        if not self.samples:
            raise self.wrong_folder(f"no patch of {root} is listed in its split files")
        self._georeference(self.samples[0].files[1])  # B02: the 10 m grid every band is read on

    def read_image(self, sample: Sample) -> np.ndarray:
        # L2A (sen2cor) surface reflectance x 10^4, 2017-2018 acquisitions: no offset.
        return _read_band_files(sample.files) * np.float32(1e-4)


class BigEarthNetV2(Reader):
    layout, title, task = "bigearthnet_v2", "BigEarthNet v2.0 (reBEN)", "multilabel"
    expected = ("metadata.parquet (patch_id, labels, split) beside BigEarthNet-S2/<tile>/<patch_id>/"
                "<patch_id>_<band>.tif for the bands " + " ".join(BIGEARTHNET_BANDS))

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        metadata, images = self.path / "metadata.parquet", self.path / "BigEarthNet-S2"
        missing = [p.name for p, found in ((metadata, metadata.is_file()), (images, images.is_dir())) if not found]
        if missing:
            raise self.wrong_folder(f"{self.path} has no {' and no '.join(missing)}")
        import pyarrow.parquet as pq

        table = pq.read_table(metadata, columns=["patch_id", "labels", "split"]).to_pydict()
        self.bands, self.classes = BIGEARTHNET_BANDS, BIGEARTHNET_CLASSES
        index = {c: k for k, c in enumerate(BIGEARTHNET_CLASSES)}
        for patch_id, labels, split in sorted(zip(table["patch_id"], table["labels"], table["split"], strict=True)):
            unknown = [n for n in labels if n not in index]
            if unknown:
                raise DataError(f"{metadata}: patch {patch_id} has labels {unknown} outside the 19 classes")
            folder = images / patch_id.rsplit("_", 2)[0] / patch_id  # the tile: the id less its row_col
            self.samples.append(Sample(patch_id, _split_name(split, metadata), tuple(sorted(index[n] for n in labels)),
                                       tuple(folder / f"{patch_id}_{b}.tif" for b in BIGEARTHNET_BANDS)))
        if not self.samples:
            raise self.wrong_folder(f"{metadata} lists no patch")
        if not self.samples[0].files[1].is_file():
            raise self.wrong_folder(f"no {self.samples[0].files[1]}")
        self._georeference(self.samples[0].files[1])

    def read_image(self, sample: Sample) -> np.ndarray:
        # L2A surface reflectance x 10^4 (sen2cor 2.11). The patch ids carry N9999 (a local
        # processing, not an ESA baseline): no offset, which the dataset's published training
        # statistics confirm (mean B02 of about 440 DN, below the +1000 an offset would add).
        offset = s2_offset_from_name(sample.id)
        return (_read_band_files(sample.files) + np.float32(offset)) * np.float32(1e-4)


class FLAIR(Reader):
    layout, title, task = "flair", "FLAIR #1 / #2 aerial", "segmentation"
    expected = ("the unpacked flair_aerial_train and flair_labels_train folders (and the test pair "
                "flair_1_aerial_test / flair_1_labels_test, or flair_2_*), each <domain>/<zone>/img/IMG_<n>.tif "
                "(R, G, B, NIR, elevation; 8-bit, 512 px, 0.2 m, Lambert-93) with "
                "<domain>/<zone>/msk/MSK_<n>.tif")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        pairs = []
        for split in ("train", "test"):
            for aerial in sorted(self.path.glob(f"*aerial_{split}")) + sorted(self.path.glob(f"*/*aerial_{split}")):
                labels = aerial.with_name(aerial.name.replace("aerial", "labels"))
                if labels.is_dir():
                    pairs.append((split, aerial, labels))
        if not any(split == "train" for split, *_ in pairs):
            raise self.wrong_folder(f"no *aerial_train folder with its *labels_train beside it in {self.path}")
        self.bands, self.classes = FLAIR_BANDS, FLAIR_CLASSES
        for split, aerial, labels in pairs:
            for image in sorted(aerial.glob("*/*/img/IMG_*.tif")):
                zone = image.parent.parent.relative_to(aerial)
                mask = labels / zone / "msk" / image.name.replace("IMG_", "MSK_")
                if not mask.is_file():
                    raise DataError(f"{image}: no mask {mask}")
                self.samples.append(Sample(image.stem, split, None, (image, mask)))
        if not self.samples:
            raise self.wrong_folder(f"no <domain>/<zone>/img/IMG_<n>.tif in {[str(a) for _, a, _ in pairs]}")
        self._georeference(self.samples[0].files[0])

    def read_image(self, sample: Sample) -> np.ndarray:
        return _read_bands(sample.files[0], len(FLAIR_BANDS)) / np.float32(255)  # 8-bit, as the aerial sensor

    def read_mask(self, sample: Sample) -> np.ndarray:
        values = _read_bands(sample.files[1], 1)[0].astype(np.int64)
        return np.where(values < 1, NO_LABEL, np.minimum(values, 13) - 1)


class ClassFolders(Reader):
    layout, title, task = "class_folders", "a folder of class folders", "classification"
    expected = "<class>/*.tif (optionally under train/ and test/), the classes sorted by name"

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        roots = _split_folders(self.path)
        classes = sorted({p.name for root in roots.values() for p in root.iterdir() if p.is_dir()}) \
            if self.path.is_dir() else []
        if not classes:
            raise self.wrong_folder(f"no class folder in {self.path}")
        self.classes = tuple(classes)
        for split, root in roots.items():
            for k, name in enumerate(classes):
                for path in sorted((root / name).glob("*.tif")) + sorted((root / name).glob("*.tiff")):
                    self.samples.append(Sample(f"{name}/{path.stem}", split, k, (path,)))
        if not self.samples:
            raise self.wrong_folder(f"no GeoTIFF in the class folders of {self.path}")
        self.bands = _generic_bands(spec, self.samples[0].files[0])
        self._georeference(self.samples[0].files[0])

    def read_image(self, sample: Sample) -> np.ndarray:
        return _generic_units(self.spec, _read_bands(sample.files[0], len(self.bands)))


class ImageMaskPairs(Reader):
    layout, title, task = "image_mask_pairs", "image/mask pairs", "segmentation"
    expected = ("images/<name>.tif with masks/<name>.tif (one band of class values), optionally under train/ "
                "and test/")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        roots = _split_folders(self.path)
        for split, root in roots.items():
            for image in sorted((root / "images").glob("*.tif")):
                mask = root / "masks" / image.name
                if not mask.is_file():
                    raise DataError(f"{image}: no mask {mask}")
                self.samples.append(Sample(image.stem, split, None, (image, mask)))
        if not self.samples:
            raise self.wrong_folder(f"no images/*.tif in {', '.join(str(r) for r in roots.values())}")
        self.bands = _generic_bands(spec, self.samples[0].files[0])
        self._georeference(self.samples[0].files[0])
        ignore = set(spec.get("ignore_values") or [])
        self.values = list(spec.get("classes") or [])
        if not self.values:  # every value found in the masks, less the ignored ones and no data
            found: set[int] = set()
            for sample in self.samples:
                found |= set(np.unique(_read_mask_values(sample.files[1])).tolist())
            self.values = sorted(found - ignore - {-1})
        self.classes = tuple(str(v) for v in self.values)
        self.lookup = {v: k for k, v in enumerate(self.values)}

    def read_image(self, sample: Sample) -> np.ndarray:
        return _generic_units(self.spec, _read_bands(sample.files[0], len(self.bands)))

    def read_mask(self, sample: Sample) -> np.ndarray:
        values = _read_mask_values(sample.files[1])
        out = np.full(values.shape, NO_LABEL, dtype=np.int64)
        for value, k in self.lookup.items():
            out[values == value] = k
        return out


LAYOUTS: dict[str, type[Reader]] = {cls.layout: cls for cls in (EuroSATMS, BigEarthNetV1, BigEarthNetV2, FLAIR,
                                                                ClassFolders, ImageMaskPairs)}


def open_benchmark(spec: Mapping[str, Any]) -> Reader:
    """The reader of ``spec["layout"]`` on the copy at ``spec["path"]``; one clear error when the
    folder does not hold that layout."""
    if spec["layout"] not in LAYOUTS:
        raise ConfigError(f"evaluate.benchmarks {spec['name']}: unknown layout {spec['layout']!r} "
                          f"(layouts: {', '.join(LAYOUTS)})")
    cls = LAYOUTS[spec["layout"]]
    if not Path(spec["path"]).is_dir():
        raise DataError(f"evaluate.benchmarks {spec['name']} (layout {cls.layout}): {spec['path']} is not a folder; "
                        f"expected {cls.title}: {cls.expected}")
    return cls(spec)


def spec_errors(benchmarks: Sequence[Mapping[str, Any]], sensors: Sequence[str]):
    """Config rules the schema cannot state: unique names, generic options only on generic
    layouts (that the sensor is an image sensor of the config is checked with the other sensor
    names, in xstars.config). Yields (key path, message)."""
    names = [b["name"] for b in benchmarks]
    for i, spec in enumerate(benchmarks):
        where = ("evaluate", "benchmarks", i)
        if names.count(spec["name"]) > 1:
            yield where + ("name",), f"{spec['name']!r} names two benchmarks"
        if spec["layout"] not in ("class_folders", "image_mask_pairs"):
            for key in GENERIC_OPTIONS:
                if spec.get(key) not in (None, [], 0):
                    yield where + (key,), (f"the {spec['layout']} layout fixes its bands, units and classes: "
                                           f"{key} is for class_folders and image_mask_pairs")
        if spec["layout"] == "class_folders" and (spec.get("classes") or spec.get("ignore_values")):
            yield where + ("classes",), "class_folders takes its classes from the folder names"


# ============================================================================ file helpers


def _read_bands(path: Path, count: int) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        if src.count != count:
            raise DataError(f"{path}: {src.count} bands, the layout has {count}")
        data = src.read(masked=True).astype(np.float32)
    return data.filled(np.nan)


def _read_band_files(files: Sequence[Path]) -> np.ndarray:
    """One file per band at its own resolution, each read onto the grid of the finest (B02)."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(files[1]) as src:
        shape = src.shape
    out = np.empty((len(files), *shape), dtype=np.float32)
    for b, path in enumerate(files):
        if not path.is_file():
            raise DataError(f"{path}: missing band file")
        with rasterio.open(path) as src:
            out[b] = src.read(1, out_shape=shape, resampling=Resampling.bilinear, out_dtype="float32")
    return out


def _read_mask_values(path: Path) -> np.ndarray:
    """Mask values, -1 where the file declares no data."""
    import rasterio

    with rasterio.open(path) as src:
        values = src.read(1, masked=True)
    return values.astype(np.int64).filled(-1)


def _generic_bands(spec: Mapping[str, Any], path: Path) -> tuple[str, ...]:
    """Band names of a generic layout: the config's, else the GeoTIFF's band descriptions."""
    import rasterio

    with rasterio.open(path) as src:
        count, descriptions = src.count, src.descriptions
    names = tuple(spec.get("bands") or ())
    if not names:
        if not all(descriptions):
            raise ConfigError(f"evaluate.benchmarks {spec['name']}: {path} does not name its bands "
                              "(no band descriptions): list them in evaluate.benchmarks[].bands, in file order")
        names = tuple(descriptions)
    if len(names) != count:
        raise DataError(f"{path}: {count} bands, evaluate.benchmarks {spec['name']}.bands names {len(names)}")
    return names


def _generic_units(spec: Mapping[str, Any], data: np.ndarray) -> np.ndarray:
    scale = spec.get("scale_factor")
    return data * np.float32(1e-4 if scale is None else scale) + np.float32(spec.get("add_offset") or 0.0)


def _split_folders(path: Path) -> dict[str | None, Path]:
    """``train/`` and ``test/`` (and ``val/``) when present: the copy's own split; else the folder."""
    found = {s: path / s for s in SPLITS if (path / s).is_dir()}
    return found if "train" in found and "test" in found else {None: path}


def _split_name(value: str, where: Path) -> str:
    name = {"validation": "val"}.get(value, value)
    if name not in SPLITS:
        raise DataError(f"{where}: split {value!r} is not train, validation or test")
    return name


def _split_lists(reader: Reader, patterns: Sequence[str], *more: Path) -> dict[str, str]:
    """Sample id -> split from per-split lists (a name in the first column of each line): the
    config's ``split_files``, else files named by ``patterns`` in the copy's folder (or beside it)."""
    given = reader.spec.get("split_files") or {}
    files: dict[str, Path] = {}
    if given:
        files = {_split_name(s, reader.path): reader.path / p for s, p in given.items()}
    else:
        for folder in dict.fromkeys((reader.path, reader.path.parent, *more)):
            for pattern in patterns:
                found = {s: folder / pattern.format(s) for s in SPLITS if (folder / pattern.format(s)).is_file()}
                if "train" in found and "test" in found:
                    files = found
                    break
            if files:
                break
    splits = {}
    for split, path in files.items():
        if not path.is_file():
            raise DataError(f"evaluate.benchmarks {reader.spec['name']}.split_files: no file {path}")
        for line in path.read_text().splitlines():
            name = line.split(",")[0].strip()
            if name:
                splits[Path(name).stem] = split  # torchgeo's EuroSAT lists name the images *.jpg
    return splits


def s2_offset_from_name(name: str) -> int:
    """Reflectance offset (DN) told by a Sentinel-2 product name's ``_Nxxyy_`` processing baseline;
    0 where the name carries none or N9999 (a product processed by its user, not by ESA)."""
    from xstars.items import s2_offset_for_baseline

    found = re.search(r"_N(\d{2})(\d{2})_", name)
    if not found or found.group(0) == "_N9999_":
        return 0
    return s2_offset_for_baseline(f"{found.group(1)}.{found.group(2)}")


# ============================================================================= band mapping


def band_mapping(benchmark_bands: Sequence[str], model_bands: Sequence[str], where: str) -> tuple[list[int], list[str]]:
    """For each band the model's sensor takes (in its order), its index in the benchmark's bands,
    matched by name; and the benchmark bands the model lacks (dropped). Raises DataError naming
    every model band the benchmark lacks."""
    missing = [b for b in model_bands if b not in benchmark_bands]
    if missing:
        raise DataError(f"{where}: the model's bands {list(model_bands)} need {missing}, which the benchmark lacks "
                        f"(it has {list(benchmark_bands)})")
    return [list(benchmark_bands).index(b) for b in model_bands], [b for b in benchmark_bands if b not in model_bands]


def sensor_gsd_m(store: Path | str, sensor: str, description: Mapping[str, Any]) -> float:
    """The model sensor's ground sampling: its exported description's, else the store's."""
    import zarr

    known = description["sensors"][sensor].get("gsd_m")
    if known:
        return float(known)
    root = zarr.open_group(str(store), mode="r")
    if sensor not in root or "gsd_m" not in root[sensor]["data"].attrs:
        raise DataError(f"{store}: no gsd_m for sensor {sensor!r} (the benchmark resolution needs it)")
    return float(root[sensor]["data"].attrs["gsd_m"])


def input_px(native_px: int, native_gsd_m: float, target_gsd_m: float | None, patch: int) -> int:
    """Pixels fed to the model: the image's footprint at ``target_gsd_m`` (None: its own pixels),
    rounded to whole patches (at least one)."""
    px = native_px if target_gsd_m is None else native_px * native_gsd_m / target_gsd_m
    return max(patch, round(px / patch) * patch)


# =============================================================================== evaluation


def evaluate_benchmark(backbone, description: Mapping[str, Any], spec: Mapping[str, Any],
                       settings: Mapping[str, Any], store: Path | str, name: str,
                       device=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every probe of one benchmark for one model (records as :func:`xstars.evaluate.evaluate_model`'s),
    and what was run: bands used and dropped, ground sampling, pixels, split, counts."""
    import torch

    from xstars import probes
    from xstars.features import embed_views

    reader = open_benchmark(spec)
    sensor = spec["sensor"]
    where = f"evaluate.benchmarks {spec['name']}"
    if sensor not in description["sensors"]:
        raise DataError(f"{where}: the model was not trained on {sensor!r} (it knows {sorted(description['sensors'])})")
    wanted = description["sensors"][sensor]
    index, dropped = band_mapping(reader.bands, wanted["bands"], f"{where} -> {sensor}")
    samples = _selected(reader.samples, spec["max_per_split"])
    first = reader.read_image(samples[0])
    target_gsd = sensor_gsd_m(store, sensor, description) if spec["resolution"] == "sensor_gsd" else None
    px = input_px(first.shape[-1], reader.gsd_m, target_gsd, backbone.patch_size)
    mean = torch.tensor(wanted["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(wanted["std"], dtype=torch.float32)[:, None, None]

    def view(image: np.ndarray) -> torch.Tensor:
        if image.shape[-2:] != first.shape[-2:]:
            raise DataError(f"{where}: images of {image.shape[-2:]} and {first.shape[-2:]} px: one size per copy")
        x = (torch.from_numpy(image[index]) - mean) / std
        x = torch.nan_to_num(x, nan=0.0)  # no data: the mean, as the store's invalid pixels
        return torch.nn.functional.interpolate(x[None], size=(px, px), mode="bilinear", antialias=True,
                                               align_corners=False)[0]

    backbone = backbone.to(device or torch.device("cpu")).eval()
    features, patches, maps = [], [], []
    batch = settings["batch_size"]
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        embedded = embed_views(backbone, torch.stack([view(reader.read_image(s)) for s in chunk]), sensor,
                                  batch, device)
        features.append(embedded.tile_features(settings["feature"]))
        if reader.task == "segmentation":
            patches.append(embedded.patches.half())  # the head's inputs: half the memory
            maps.extend(resample_mask(reader.read_mask(s), px, len(reader.classes)) for s in chunk)
    x = torch.cat(features)
    task = f"benchmark:{spec['name']}" + (" (fake)" if reader.fake else "")
    records: list[dict[str, Any]] = []

    def record(metric: str, value: float, fraction: float, seed: int) -> None:
        records.append({"model": name, "task": task, "metric": metric, "value": round(float(value), 6),
                        "train_sensor": sensor, "test_sensor": sensor, "fraction": fraction, "seed": seed})

    n_classes = len(reader.classes)
    if reader.task == "classification":
        y = torch.tensor([s.target for s in samples])
    elif reader.task == "multilabel":
        y = torch.zeros(len(samples), n_classes)
        for i, s in enumerate(samples):
            y[i, list(s.target)] = 1.0
    else:
        y = torch.from_numpy(np.stack(maps))
        tokens = torch.cat(patches).float()
    counts = None
    for seed in settings["probe_seeds"]:
        train, test = split_indices(samples, spec, seed, reader.task)
        counts = counts or {"train": len(train), "test": len(test)}
        for fraction in settings["label_fractions"]:
            chosen = train[probes.subset(len(train), fraction, seed)]
            if reader.task == "segmentation":
                head = probes.fit_segmentation(tokens[chosen], y[chosen], n_classes, seed,
                                               settings["segmentation_epochs"])
                record("miou", probes.mean_iou(head, tokens[test], y[test], n_classes), fraction, seed)
                continue
            x_train, x_test = probes.standardise(x[chosen], x[test])
            probe = probes.fit_linear(x_train, y[chosen], n_classes, seed, multilabel=reader.task == "multilabel")
            with torch.no_grad():
                scores = probe(x_test)
            if reader.task == "multilabel":
                record("map", probes.mean_average_precision(scores, y[test]), fraction, seed)
            else:
                record("knn_accuracy", probes.knn_accuracy(x[chosen], y[chosen], x[test], y[test], n_classes,
                                                           settings["knn_k"]), fraction, seed)
                record("linear_accuracy", float((scores.argmax(dim=1) == y[test]).float().mean()), fraction, seed)
    footprint_m = first.shape[-1] * reader.gsd_m
    info = {"name": spec["name"], "task_name": task, "layout": reader.layout, "title": reader.title,
            "task": reader.task, "path": str(reader.path), "fake": reader.fake, "sensor": sensor,
            "bands": [reader.bands[i] for i in index], "dropped_bands": dropped, "classes": list(reader.classes),
            "crs": reader.crs, "native_gsd_m": round(reader.gsd_m, 4), "native_px": int(first.shape[-1]),
            "resolution": spec["resolution"], "gsd_m": round(footprint_m / px, 4), "input_px": px,
            "split": "official" if samples[0].split is not None else f"random (test_fraction {spec['test_fraction']})",
            "samples": len(samples), **(counts or {})}
    return records, info


def _selected(samples: Sequence[Sample], max_per_split: int) -> list[Sample]:
    """At most ``max_per_split`` samples of each split (a fixed draw, in id order), for a quick
    look at a large copy; all of them with 0."""
    if not max_per_split:
        return list(samples)
    chosen = []
    for split in dict.fromkeys(s.split for s in samples):
        group = [s for s in samples if s.split == split]
        keep = np.sort(np.random.default_rng(17).permutation(len(group))[:max_per_split])
        chosen += [group[i] for i in keep]
    return chosen


def split_indices(samples: Sequence[Sample], spec: Mapping[str, Any], seed: int, task: str):
    """Train and test indices: the layout's own split (``train_splits`` / ``test_splits``), else
    a draw per probe seed holding out ``test_fraction`` (of each class for classification)."""
    import torch

    if samples[0].split is not None:
        splits = np.array([s.split for s in samples])
        train, test = (np.nonzero(np.isin(splits, spec[key]))[0] for key in ("train_splits", "test_splits"))
        if len(train) == 0 or len(test) < 2:
            raise DataError(f"evaluate.benchmarks {spec['name']}: {len(train)} samples in {spec['train_splits']}, "
                            f"{len(test)} in {spec['test_splits']} (the copy has {sorted(set(splits))})")
        return torch.from_numpy(train), torch.from_numpy(test)
    rng = np.random.default_rng([seed, 29])
    if task == "classification":
        targets = np.array([s.target for s in samples])
        groups = [np.nonzero(targets == k)[0] for k in np.unique(targets)]
    else:
        groups = [np.arange(len(samples))]
    test = np.concatenate([rng.permutation(g)[:max(1, round(spec["test_fraction"] * len(g)))] for g in groups])
    is_test = np.zeros(len(samples), dtype=bool)
    is_test[test] = True
    if is_test.all():
        raise DataError(f"evaluate.benchmarks {spec['name']}: {len(samples)} samples leave none to train on")
    return torch.from_numpy(np.nonzero(~is_test)[0]), torch.from_numpy(np.nonzero(is_test)[0])


def resample_mask(mask: np.ndarray, px: int, classes: int):
    """A class map onto ``px`` x ``px``: the majority class under each output pixel when reducing
    (nearest when enlarging); NO_LABEL where no pixel has a class."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask)
    if m.shape[-1] <= px:
        return F.interpolate(m[None, None].float(), size=(px, px), mode="nearest")[0, 0].long()
    known = m != NO_LABEL
    onehot = F.one_hot(torch.where(known, m, 0), classes).permute(2, 0, 1).float() * known
    share = F.interpolate(onehot[None], size=(px, px), mode="area")[0]
    return torch.where(share.sum(dim=0) > 0, share.argmax(dim=0), NO_LABEL)


# ================================================================================== report


def benchmark_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The benchmarks' section of results.md: one row per benchmark, model and metric, a column
    per label fraction (mean ± spread over probe seeds), then what each benchmark ran on."""
    from xstars.evaluate import summarise

    infos = {i["task_name"]: i for r in results for i in r.get("benchmarks", [])}
    if not infos:
        return []
    rows = [r for r in summarise(results) if r["task"] in infos]
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    labels = {"knn_accuracy": "k-NN acc.", "linear_accuracy": "linear acc.", "map": "mAP", "miou": "mIoU"}
    lines = ["", "Public benchmarks (their published layouts; rows marked (fake) ran on the generated fake copies):",
             "", "| benchmark | model | metric | " + " | ".join(f"{100 * f:g} % labels" for f in fractions) + " |",
             "|---|---|---|" + "---|" * len(fractions)]
    for task, info in infos.items():
        for model in dict.fromkeys(r["model"] for r in rows):
            for metric in dict.fromkeys(r["metric"] for r in rows if r["task"] == task):
                cells = []
                for f in fractions:
                    found = [r for r in rows if (r["task"], r["model"], r["metric"], r["fraction"]) == (task, model, metric, f)]
                    cells.append(f"{found[0]['mean']:.3f} ± {found[0]['std']:.3f}" if found else "")
                lines.append(f"| {task.removeprefix('benchmark:')} | {model} | {labels.get(metric, metric)} | "
                             + " | ".join(cells) + " |")
    lines.append("")
    for task, info in infos.items():
        lines.append(
            f"- {task.removeprefix('benchmark:')}: {info['title']} ({info['layout']}, {info['task']}) at {info['path']}; "
            f"{info['samples']} images ({info.get('train', '?')} train, {info.get('test', '?')} test, "
            f"{info['split']} split); sensor {info['sensor']} bands {' '.join(info['bands'])}"
            + (f", dropped {' '.join(info['dropped_bands'])}" if info["dropped_bands"] else "")
            + f"; {info['native_gsd_m']:g} m x {info['native_px']} px fed at {info['gsd_m']:g} m x {info['input_px']} px "
            f"({info['resolution']})" + ("; FAKE copy (xstars demo benchmarks)" if info["fake"] else "") + ".")
    return lines
