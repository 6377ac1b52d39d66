"""MSC-France as its authors released it, both ways: a folder of images <-> an xstars store.

The released layout (the X-STARS repository's README and loader)::

    MSC-France/<Sensor>/<City>/<tile>      e.g. SPOT/Bordeaux/0001.png, Sentinel/Bordeaux/0001.png

8-bit RGB images read with PIL (``Image.open(path).convert("RGB")``); the tiles of one place
share their file name across the sensor folders; the images carry no georeferencing.

* :func:`import_folder` (``xstars import msc-france DIR``) makes a store of such a folder that
  pretraining and evaluation read like a built one: one group per sensor folder named in
  ``msc_france.import_sensors``, one sample per (city, tile name), the city as region and split
  unit (``msc_france.val_cities`` / ``test_cities``), RGB as uint8 DN / 255. The ground size of a
  tile comes from config (``msc_france.footprint_m``): each sensor's pixel size is that divided by
  its images' width, and the samples are laid side by side on a nominal grid in a local
  engineering CRS (their true positions are not in the download). A tile missing from one sensor
  makes its sample ``dropped: <reason>``, as the build does.
* :func:`export_store` (``xstars export msc-france STORE DIR``) writes a store in that layout, so
  that code written for the released dataset runs on the rebuilt one: per sensor of
  ``msc_france.export_sensors`` three bands mapped onto 0-255, one image per kept sample named
  after its site, ``tiles.csv`` (each tile's split, dates, source items and unusable fraction) and
  ``README.md`` (which sensor each folder holds, and the per-sensor normalisation to use in place
  of the released one, measured on the exported images).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xstars.errors import ConfigError, DataError
from xstars.layout import IMAGE, LAYOUT_VERSION, image_sensors, open_store

log = logging.getLogger(__name__)

#: File types the released loader (torchvision's ImageFolder) accepts.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm")
#: The CRS of an imported store when msc_france.crs is empty: metres, no place on Earth.
LOCAL_CRS_WKT = ('ENGCRS["xstars tile grid (no georeferencing)",EDATUM["tiles laid side by side, positions unknown"],'
                 'CS[Cartesian,2],AXIS["easting (E)",east,ORDER[1],LENGTHUNIT["metre",1]],'
                 'AXIS["northing (N)",north,ORDER[2],LENGTHUNIT["metre",1]]]')
SOURCE = "msc-france"


# ================================================================================== import


@dataclass(frozen=True)
class Tile:
    """One place of the released dataset: its city, its file stem, and its file per sensor folder."""

    city: str
    name: str  # the file name without its suffix, shared by the sensors
    files: Mapping[str, Path]  # sensor folder -> image file (absent when that sensor lacks it)

    @property
    def site_id(self) -> str:
        return f"{self.city}_{self.name}"


def scan_folder(root: Path, folders: Sequence[str]) -> list[Tile]:
    """Every (city, tile name) found under ``root/<folder>/<City>/``, sorted by site id."""
    places: dict[tuple[str, str], dict[str, Path]] = {}
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"{base}: no such folder (msc_france.import_sensors names {folder!r}; {root} has "
                            f"{found}): give the folder of the released dataset, or list its sensors there")
        for city in sorted(p for p in base.iterdir() if p.is_dir()):
            for path in sorted(city.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    files = places.setdefault((city.name, path.stem), {})
                    if folder in files:
                        raise DataError(f"{path}: a second image named {path.stem!r} in {city} ({files[folder].name})")
                    files[folder] = path
    if not places:
        raise DataError(f"{root}: no image under {'/, '.join(folders)}/<City>/ (the released layout)")
    tiles = [Tile(city, name, files) for (city, name), files in places.items()]
    return sorted(tiles, key=lambda t: t.site_id)


def import_folder(source: Path | str, store: Path | str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Write the store of a folder in the released layout; ``settings``: the ``msc_france`` config.

    Returns counts (samples, kept, dropped, per split). Raises ConfigError naming the
    ``msc_france`` key at fault, DataError naming the file at fault."""
    import zarr

    from xstars.store import _combine_statistics, _sums

    source, store = Path(source), Path(store)
    footprint = float(settings["footprint_m"])
    if footprint <= 0:
        raise ConfigError("config key 'msc_france.footprint_m': not set; the released images carry no "
                          "georeferencing: give the ground size of a tile in metres (--set msc_france.footprint_m=...)")
    if not source.is_dir():
        raise DataError(f"{source}: no such folder (the released dataset: <Sensor>/<City>/<tile> images)")
    sensors = {folder: entry["sensor"] for folder, entry in settings["import_sensors"].items()}
    if not sensors:
        raise ConfigError("config key 'msc_france.import_sensors': empty, nothing to import")
    tiles = scan_folder(source, list(sensors))
    cities = sorted({t.city for t in tiles})
    splits = _city_splits(cities, settings)
    sizes = {folder: _tile_size(folder, tiles) for folder in sensors}
    per_shard = int(settings["samples_per_shard"])
    n = len(tiles)
    crs_wkt = _crs_wkt(settings["crs"])

    root = zarr.open_group(str(store), mode="w", zarr_format=3)
    root.attrs["xstars"] = {
        "layout_version": LAYOUT_VERSION, "samples": n, "samples_per_shard": per_shard,
        "parts": max(1, math.ceil(n / per_shard)), "crs": crs_wkt, "footprint_m": footprint,
        "source": SOURCE, "georeferenced": False,
        "sensors": {sensors[f]: {"role": IMAGE, "folder": f} for f in sensors},
    }
    groups = {}
    for folder, name in sensors.items():
        px = sizes[folder]
        bands = list(settings["import_sensors"][folder]["bands"])
        group = root.create_group(name)
        attrs = {"grid_mapping": "spatial_ref", "gsd_m": footprint / px, "scale_factor": 1 / 255, "add_offset": 0.0,
                 "units": "1", "long_name": f"8-bit RGB of the released {folder} images, DN / 255"}
        group.create_array("data", shape=(n, 3, px, px), dtype="uint8", chunks=(1, 3, px, px),
                           shards=(per_shard, 3, px, px), fill_value=0, dimension_names=["sample", "band", "y", "x"],
                           attributes=attrs)
        group.create_array("valid", shape=(n, px, px), dtype="uint8", chunks=(1, px, px), shards=(per_shard, px, px),
                           fill_value=0, dimension_names=["sample", "y", "x"],
                           attributes={"long_name": "1 where the pixel is usable (every pixel of a released tile)",
                                       "grid_mapping": "spatial_ref"})
        group.create_array("band", shape=(3,), dtype=str, dimension_names=["band"])[:] = np.array(bands, dtype=object)
        for key in ("site_id", "region", "split", "status", "date", "item_id"):
            group.create_array(key, shape=(n,), dtype=str, chunks=(per_shard,), dimension_names=["sample"])
        group.create_array("cloud_fraction", shape=(n,), dtype="float32", chunks=(per_shard,), fill_value=np.nan,
                           dimension_names=["sample"])
        group.create_array("transform", shape=(n, 6), dtype="float64", chunks=(per_shard, 6), fill_value=np.nan,
                           dimension_names=["sample", "affine"],
                           attributes={"long_name": "nominal geotransform: tiles side by side, no georeferencing"})
        group.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0, dimension_names=[],
                           attributes={"crs_wkt": crs_wkt, "spatial_ref": crs_wkt})[()] = 0
        groups[folder] = group

    sums: dict[str, list[dict[str, Any]]] = {folder: [] for folder in sensors}
    kept = 0
    for first in range(0, n, per_shard):
        chunk = tiles[first:first + per_shard]
        for folder, group in groups.items():
            px = sizes[folder]
            data = np.zeros((len(chunk), 3, px, px), dtype=np.uint8)
            valid = np.zeros((len(chunk), px, px), dtype=np.uint8)
            meta = {key: np.array([""] * len(chunk), dtype=object) for key in ("site_id", "region", "split", "status",
                                                                                "item_id", "date")}
            transform = np.full((len(chunk), 6), np.nan)
            fraction = np.full(len(chunk), np.nan, dtype=np.float32)
            for k, tile in enumerate(chunk):
                meta["site_id"][k], meta["region"][k], meta["split"][k] = tile.site_id, tile.city, splits[tile.city]
                meta["status"][k] = _status(tile, sensors)
                if meta["status"][k] != "ok":
                    continue
                path = tile.files[folder]
                image = _read_rgb(path, px)
                data[k] = image.transpose(2, 0, 1)
                valid[k] = 1
                fraction[k] = 0.0
                meta["item_id"][k] = path.relative_to(source).as_posix()
                gsd = footprint / px
                transform[k] = (footprint * (first + k), gsd, 0.0, footprint, 0.0, -gsd)
            keep = [k for k in range(len(chunk)) if meta["status"][k] == "ok" and meta["split"][k] == "train"]
            sums[folder].append(_sums(((data[k], valid[k]) for k in keep), 1 / 255, 3))
            last = first + len(chunk)
            group["data"][first:last] = data
            group["valid"][first:last] = valid
            group["transform"][first:last] = transform
            group["cloud_fraction"][first:last] = fraction
            for key, values in meta.items():
                group[key][first:last] = values
        kept += sum(all(f in t.files for f in sensors) for t in chunk)
    for folder, group in groups.items():
        group.attrs["normalization"] = _combine_statistics(sums[folder])
    zarr.consolidate_metadata(str(store))
    counts = {split: sum(1 for t in tiles if splits[t.city] == split and len(t.files) == len(sensors))
              for split in ("train", "val", "test")}
    summary = {"store": str(store), "samples": n, "kept": kept, "dropped": n - kept, "cities": cities,
               "kept_per_split": counts, "sensors": {sensors[f]: {"folder": f, "tile_px": sizes[f],
                                                                   "gsd_m": footprint / sizes[f]} for f in sensors}}
    log.info("import msc-france %s -> %s: %d samples (%d dropped), cities %s", source, store, n, n - kept, cities)
    return summary


def _status(tile: Tile, folders: Sequence[str]) -> str:
    """``ok``, or why the place is dropped: the sensor folders that lack its tile."""
    missing = [f for f in folders if f not in tile.files]
    if not missing:
        return "ok"
    where = "; ".join(f"{f}/{tile.city}/{tile.name}.*" for f in missing)
    return f"dropped: {', '.join(missing)} missing ({where})"


def _city_splits(cities: Sequence[str], settings: Mapping[str, Any]) -> dict[str, str]:
    for key in ("val_cities", "test_cities"):
        for i, city in enumerate(settings[key]):
            if city not in cities:
                raise ConfigError(f"config key 'msc_france.{key}.{i}': {city!r} is not a city of the folder {cities}")
    both = set(settings["val_cities"]) & set(settings["test_cities"])
    if both:
        raise ConfigError(f"config key 'msc_france.test_cities': {sorted(both)} also in val_cities")
    return {c: "val" if c in settings["val_cities"] else "test" if c in settings["test_cities"] else "train"
            for c in cities}


def _tile_size(folder: str, tiles: Sequence[Tile]) -> int:
    """Pixels per side of a sensor's tiles (all must be square and of one size).

    Every file's header is read here, before the store is created: a tile of another size or
    a file that is not an image stops the import without leaving a half-written store."""
    from PIL import Image, UnidentifiedImageError

    first, px = None, 0
    for path in (t.files[folder] for t in tiles if folder in t.files):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from None
        if first is None:
            if width != height:
                raise DataError(f"{path}: {width} x {height} pixels; xstars stores square tiles")
            first, px = path, width
        elif (width, height) != (px, px):
            raise DataError(f"{path}: {width} x {height} pixels, the other tiles of {folder}/ are {px} x {px} "
                            f"(as {first})")
    return px


def _read_rgb(path: Path, px: int) -> np.ndarray:
    """An image as [px, px, 3] uint8, converted to RGB as the released loader does."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    if rgb.shape[:2] != (px, px):
        raise DataError(f"{path}: {rgb.shape[1]} x {rgb.shape[0]} pixels, the other tiles of its sensor are "
                        f"{px} x {px}")
    return rgb


def _crs_wkt(crs: str) -> str:
    if not crs:
        return LOCAL_CRS_WKT
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(crs).to_wkt()
    except CRSError as err:
        raise ConfigError(f"config key 'msc_france.crs': {crs!r} is not a CRS ({err})") from None


# ================================================================================== export


def export_store(store: Path | str, out: Path | str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Write the store's sensors of ``msc_france.export_sensors`` in the released layout under ``out``.

    Only samples kept by every exported sensor are written (a released tile exists for every
    sensor). Returns what was written per folder, with the normalisation measured on it."""
    from PIL import Image

    store, out = Path(store), Path(out)
    root = open_store(store)
    present = set(image_sensors(root))
    chosen: dict[str, str] = {}  # folder -> store sensor
    for name, entry in settings["export_sensors"].items():
        if name in present and entry["folder"] not in chosen:
            chosen[entry["folder"]] = name
        elif name in present:
            log.info("export: %s/ is written from %s, not from %s (first in msc_france.export_sensors)",
                     entry["folder"], chosen[entry["folder"]], name)
    if not chosen:
        raise ConfigError(f"config key 'msc_france.export_sensors': none of {list(settings['export_sensors'])} is an "
                          f"image sensor of {store} ({sorted(present)})")
    plans = {}
    for folder, name in chosen.items():
        entry = settings["export_sensors"][name]
        group = root[name]
        bands = [str(b) for b in group["band"][:]]
        unknown = [b for b in entry["bands"] if b not in bands]
        if unknown:
            raise ConfigError(f"config key 'msc_france.export_sensors.{name}.bands': {unknown} not in the store's "
                              f"bands {bands}")
        low, high = (float(v) for v in entry["range"])
        if not high > low:
            raise ConfigError(f"config key 'msc_france.export_sensors.{name}.range': {entry['range']} is empty")
        attrs = group["data"].attrs
        plans[folder] = (name, [bands.index(b) for b in entry["bands"]], low, high,
                         float(attrs.get("scale_factor", 1.0)), float(attrs.get("add_offset", 0.0)))
    first = root[next(iter(chosen.values()))]
    site_ids, regions, splits = first["site_id"][:], first["region"][:], first["split"][:]
    ok = np.ones(len(site_ids), dtype=bool)
    for name in chosen.values():
        ok &= root[name]["status"][:] == "ok"
    samples = np.nonzero(ok)[0]
    if not len(samples):
        raise DataError(f"{store}: no sample kept by every exported sensor {list(chosen.values())}")
    names = {i: tile_name(str(site_ids[i]), str(regions[i])) for i in samples}
    suffix = {"png": ".png", "tif": ".tif", "jpg": ".jpg"}[settings["image_format"]]
    totals = {folder: (np.zeros(3), np.zeros(3), 0) for folder in chosen}
    per_shard = int(root.attrs["xstars"]["samples_per_shard"])
    meta = {name: {key: root[name][key][:] for key in ("date", "item_id", "cloud_fraction")} for name in chosen.values()}
    for shard in np.unique(samples // per_shard):  # one read per shard and sensor
        chunk = [int(i) for i in samples if i // per_shard == shard]
        for folder, (name, index, low, high, scale, offset) in plans.items():
            data = root[name]["data"][chunk[0]:chunk[-1] + 1]
            for i in chunk:
                values = data[i - chunk[0]][index].astype(np.float64) * scale + offset
                image = np.clip(np.round((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)
                path = out / folder / str(regions[i]) / f"{names[i]}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.transpose(1, 2, 0)).save(path)
                unit = image.reshape(3, -1) / 255.0
                s, sq, count = totals[folder]
                totals[folder] = (s + unit.sum(axis=1), sq + (unit**2).sum(axis=1), count + unit.shape[1])
    normalization = {}
    for folder, (s, sq, count) in totals.items():
        mean = s / count
        normalization[folder] = {"mean": [round(float(v), 6) for v in mean],
                                 "std": [round(float(v), 6) for v in np.sqrt(np.maximum(sq / count - mean**2, 0))]}
    _write_tiles_csv(out / "tiles.csv", samples, names, regions, splits, chosen, meta, suffix)
    summary = {"store": str(store), "out": str(out), "tiles": len(samples), "skipped": int(len(site_ids) - len(samples)),
               "folders": {folder: {"sensor": name, "bands": settings["export_sensors"][name]["bands"],
                                    "range": settings["export_sensors"][name]["range"],
                                    "long_name": str(root[name]["data"].attrs.get("long_name", "")),
                                    "gsd_m": root[name]["data"].attrs.get("gsd_m"),
                                    "tile_px": int(root[name]["data"].shape[-1]),
                                    "normalization": normalization[folder]} for folder, name in chosen.items()},
               "splits": {split: sorted({str(regions[i]) for i in samples if splits[i] == split})
                          for split in sorted({str(splits[i]) for i in samples})}}
    (out / "README.md").write_text(render_readme(summary, settings), encoding="utf-8")
    log.info("export msc-france %s -> %s: %d tiles per folder (%s), %d samples skipped", store, out, len(samples),
             ", ".join(f"{f} from {n}" for f, n in chosen.items()), summary["skipped"])
    return summary


def tile_name(site_id: str, region: str) -> str:
    """A sample's file name in its city folder: its site id without the ``<region>_`` prefix
    (site ids are ``<region>_<rest>``, built or imported), so that an imported tile keeps its name."""
    prefix = f"{region}_"
    return site_id[len(prefix):] if region and site_id.startswith(prefix) else site_id


def _write_tiles_csv(path: Path, samples, names, regions, splits, chosen: Mapping[str, str],
                     meta: Mapping[str, Mapping[str, np.ndarray]], suffix: str) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        header = ["file", "city", "split", "sample"]
        for folder in chosen:
            header += [f"{folder}_date", f"{folder}_item_id", f"{folder}_unusable_fraction"]
        writer.writerow(header)
        for i in samples:
            row = [f"{names[i]}{suffix}", str(regions[i]), str(splits[i]), int(i)]
            for name in chosen.values():
                fraction = float(meta[name]["cloud_fraction"][i])
                row += [str(meta[name]["date"][i]), str(meta[name]["item_id"][i]),
                        "" if math.isnan(fraction) else f"{fraction:.4f}"]
            writer.writerow(row)


def render_readme(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The export's README: what each folder holds, and how to normalise it."""
    released = settings["released_normalization"]
    lines = ["# An xstars store in the layout of the released MSC-France", "",
             (f"Written by `xstars export msc-france` from `{summary['store']}`: {summary['tiles']} tiles per sensor "
             "folder, `<Sensor>/<City>/<tile>`, the tiles of one place sharing their file name, 8-bit RGB "
             f"({summary['skipped']} sample(s) not kept by every sensor left out). `tiles.csv` gives each "
             "tile's split, acquisition dates, source items and the fraction of its pixels that the store marks "
             "unusable (cloud, shadow, no data): the images themselves do not mark them."), "",
             "| folder | holds | bands as R, G, B | range mapped to 0-255 | pixel | tile |", "|---|---|---|---|---|---|"]
    for folder, f in summary["folders"].items():
        lines.append(f"| {folder}/ | `{f['sensor']}`: {f['long_name']} | {' '.join(f['bands'])} | "
                     f"{f['range'][0]:g} to {f['range'][1]:g} | {f['gsd_m']:g} m | {f['tile_px']} px |")
    lines += ["", "Cities per split: " + "; ".join(f"{split}: {', '.join(cities)}"
                                                  for split, cities in summary["splits"].items()) + ".", "",
              "## Normalisation", "",
              ("The released code normalises each sensor's images (scaled to 0-1) with fixed per-sensor statistics. "
              "These images have their own: use the measured values (over every exported tile) in their place."), "",
              "| folder | measured mean (R, G, B) | measured std | released mean | released std |",
              "|---|---|---|---|---|"]
    for folder, f in summary["folders"].items():
        ref = released.get(folder)
        lines.append(f"| {folder} | {_triple(f['normalization']['mean'])} | {_triple(f['normalization']['std'])} | "
                     f"{_triple(ref['mean']) if ref else '-'} | {_triple(ref['std']) if ref else '-'} |")
    return "\n".join(lines) + "\n"


def _triple(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)
