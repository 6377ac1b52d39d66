"""Publish: the built store as an artefact others can find, cite, load and rebuild.

``xstars build publish`` (rule ``publish_dataset``, after ``dataset``) writes beside the store::

    DATASET.md          the dataset card: what it is, sensors and bands, counts per split and
                        city, dropped sites, per-band statistics, dates, hashes, how to rebuild
                        it bit for bit, every source's licence and attribution
    build_config.yaml   the resolved config sections the build read (its hash is in the card)
    samples.csv         one row per stored sample: site, city, split, status, bounds, dates and
                        source item of every sensor (what the Croissant record set reads)
    stac/collection.json  a static STAC collection: the Zarr store and each sensor's group as
                        assets (datacube extension), one item per kept site (projection extension)
    croissant.json      Croissant (JSON-LD) metadata: the files and the ``samples`` record set

Every figure is read from the store (and the manifest, for the source collections); licences
and attributions come from ``xstars/resources/licences.yaml``, keyed by source collection. The
outputs hold no timestamp: publishing the same store twice gives the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xstars import __version__
from xstars.config import BUILD_SECTIONS
from xstars.errors import DataError
from xstars.layout import IMAGE, LABELS, LAYOUT_VERSION, open_store, store_sensors

log = logging.getLogger(__name__)

#: Media type of a Zarr store, as STAC and GeoZarr use it.
ZARR_MEDIA_TYPE = "application/vnd+zarr"
STAC_EXTENSIONS = {"projection": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                   "datacube": "https://stac-extensions.github.io/datacube/v2.2.0/schema.json"}
CARD, BUILD_CONFIG, SAMPLES_CSV, STAC_DIR, CROISSANT = ("DATASET.md", "build_config.yaml", "samples.csv", "stac",
                                                        "croissant.json")


# =================================================================================== facts


@dataclass(frozen=True)
class SensorFacts:
    """One sensor of the store, as its arrays and attributes describe it."""

    name: str
    role: str  # image | labels
    bands: tuple[str, ...]
    gsd_m: float
    tile_px: int
    dtype: str
    scale_factor: float
    add_offset: float
    units: str
    long_name: str
    flag_values: tuple[int, ...]
    normalization: Mapping[str, Any] | None
    collections: tuple[str, ...]  # source collections (from the manifest)
    first_date: str
    last_date: str
    years: tuple[int, ...]


def load_licences() -> dict[str, dict[str, Any]]:
    """The licence of every known source collection (``xstars/resources/licences.yaml``)."""
    text = resources.files("xstars").joinpath("resources", "licences.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def describe_sensors(root, manifest=None) -> list[SensorFacts]:
    """Every sensor of the store with its bands, grid, encoding, statistics, dates and sources."""
    out = []
    for name, entry in store_sensors(root).items():
        group = root[name]
        attrs = dict(group["data"].attrs)
        status = group["status"][:]
        dates = sorted(str(d) for d, s in zip(group["date"][:], status, strict=True) if s == "ok" and d)
        collections: tuple[str, ...] = ()
        if manifest is not None:
            rows = manifest[(manifest.sensor == name) & (manifest.collection != "")]
            collections = tuple(sorted(set(rows.collection)))
        out.append(SensorFacts(
            name=name, role=entry["role"], bands=tuple(str(b) for b in group["band"][:]),
            gsd_m=float(attrs.get("gsd_m", math.nan)), tile_px=int(group["data"].shape[-1]),
            dtype=str(group["data"].dtype), scale_factor=float(attrs.get("scale_factor", 1.0)),
            add_offset=float(attrs.get("add_offset", 0.0)), units=str(attrs.get("units", "")),
            long_name=str(attrs.get("long_name", "")), flag_values=tuple(attrs.get("flag_values", ())),
            normalization=group.attrs.get("normalization"), collections=collections,
            first_date=dates[0] if dates else "", last_date=dates[-1] if dates else "",
            years=tuple(sorted({int(d[:4]) for d in dates}))))
    return out


def sample_rows(root, sensors: Sequence[SensorFacts]) -> list[dict[str, Any]]:
    """One row per stored sample: identity, status, footprint bounds (store CRS), each sensor's
    date and source item. Dropped samples have no bounds, dates nor items."""
    first = next((s for s in sensors if s.role == IMAGE), sensors[0])
    group = root[first.name]
    columns = {name: group[name][:] for name in ("site_id", "split", "status")}
    columns["region"] = group["region"][:]
    transforms = group["transform"][:]
    per_sensor = {s.name: (root[s.name]["date"][:], root[s.name]["item_id"][:]) for s in sensors}
    rows = []
    for i in range(len(columns["site_id"])):
        x0, dx, _, y0, _, dy = (float(v) for v in transforms[i])
        ok = columns["status"][i] == "ok" and math.isfinite(x0)
        row: dict[str, Any] = {"sample": i, "site_id": str(columns["site_id"][i]), "region": str(columns["region"][i]),
                               "split": str(columns["split"][i]), "status": str(columns["status"][i])}
        bounds = (x0, y0 + dy * first.tile_px, x0 + dx * first.tile_px, y0) if ok else (None,) * 4
        row |= dict(zip(("xmin", "ymin", "xmax", "ymax"), bounds, strict=True))
        for name, (dates, items) in per_sensor.items():
            row[f"{name}_date"] = str(dates[i]) if ok else ""
            row[f"{name}_item_id"] = str(items[i]) if ok else ""
        rows.append(row)
    return rows


def config_sha256(build_config: Mapping[str, Any]) -> str:
    """SHA-256 of the build config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(build_config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def store_fingerprint(root) -> str:
    """SHA-256 of the shard checksums recorded at build time (canonical JSON): two stores with the
    same fingerprint have the same bytes in every shard (``xstars build verify`` checks the shards
    against those checksums)."""
    recorded = root.attrs["xstars"].get("shard_sha256")
    if not recorded:
        raise DataError(f"{_where(root)}: no shard checksums recorded (not finalised by `xstars build finalize`)")
    return hashlib.sha256(json.dumps(recorded, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    from xstars.manifest import file_sha256 as sha

    return sha(path)


# ==================================================================================== card


def counts_by_region(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(splits in a stable order, region -> split -> kept samples, with a ``dropped`` column)."""
    order = {"train": 0, "val": 1, "test": 2}
    splits = sorted({r["split"] for r in rows}, key=lambda s: (order.get(s, 3), s))
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        cells = table.setdefault(r["region"], {s: 0 for s in [*splits, "dropped"]})
        cells["dropped" if r["status"] != "ok" else r["split"]] += 1
    return splits, dict(sorted(table.items()))


def dropped_by_reason(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Dropped samples counted by reason (the detail in parentheses left out)."""
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            reason = r["status"].removeprefix("dropped: ").split(" (")[0].strip() or "(no reason given)"
            reasons[reason] = reasons.get(reason, 0) + 1
    return dict(sorted(reasons.items()))


def render_card(meta: Mapping[str, Any], sensors: Sequence[SensorFacts], rows: Sequence[Mapping[str, Any]],
                licences: Mapping[str, Mapping[str, Any]], hashes: Mapping[str, str], config: Mapping[str, Any],
                paths: Mapping[str, str]) -> str:
    """The dataset card (Markdown), every number from the arguments."""
    publish = config["publish"]
    kept = [r for r in rows if r["status"] == "ok"]
    images = [s for s in sensors if s.role == IMAGE]
    dates = sorted(d for s in sensors for d in (s.first_date, s.last_date) if d)
    lines = [f"# {publish['title']}", ""]
    if config["world"] == "demo":
        lines += ["> **Synthetic.** This store was built from the offline demo world of `xstars demo generate`: no",
                  "> pixel is real. Its sources imitate the real collections, whose licences are listed below so",
                  "> that this card has the shape of the real one.", ""]
    lines += [
        publish["description"], "",
        f"{len(rows)} sites ({len(kept)} kept, {len(rows) - len(kept)} dropped with their reason), each a "
        f"{meta['footprint_m']:g} m square footprint in {meta['crs']} seen by {len(images)} imaging sensors "
        f"({', '.join(s.name for s in images)})"
        + "".join(f", with the label maps of {s.name}" for s in sensors if s.role == LABELS)
        + (f", acquired {dates[0][:10]} to {dates[-1][:10]}." if dates else "."),
        "",
        f"Store: `{paths['store']}` (Zarr v3, layout version {meta['layout_version']}, "
        f"{meta['samples_per_shard']} samples per shard). STAC: `{paths['stac']}`. Croissant: `{paths['croissant']}`. "
        f"Samples table: `{paths['samples']}`." + (f" Published at {publish['url']}." if publish["url"] else ""),
        "",
        "## Sensors", "",
        "| sensor | role | source | bands | values | stored as | units | pixel | tile | acquired |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sensors:
        stored = s.dtype + (f" x {s.scale_factor:.6g}" if s.scale_factor != 1.0 else "") + (
            f" + {s.add_offset:g}" if s.add_offset else "")
        what = s.long_name + (f" (classes {', '.join(map(str, s.flag_values))})" if s.flag_values else "")
        span = f"{s.first_date[:10]} to {s.last_date[:10]}" if s.first_date else "-"
        lines.append(f"| {s.name} | {s.role} | {', '.join(s.collections) or '-'} | {' '.join(s.bands)} | {what} | "
                     f"{stored} | {s.units or '-'} | {s.gsd_m:g} m | {s.tile_px} x {s.tile_px} px | {span} |")
    lines += ["", ("Values are physical once `scale_factor` is applied (reflectance and DN / 255 are dimensionless, "
                   "units `1`). Dates are the stored `date` of the kept samples: a source dated by a period (an IGN "
                   "campaign year) is dated at the middle of it.")]
    splits, table = counts_by_region(rows)
    lines += ["", "## Samples per split and city", "",
              "| city | " + " | ".join(splits) + " | dropped | total |", "|---|" + "---|" * (len(splits) + 2)]
    for region, cells in table.items():
        lines.append(f"| {region} | " + " | ".join(str(cells[s]) for s in splits) +
                     f" | {cells['dropped']} | {sum(cells.values())} |")
    totals = {s: sum(c[s] for c in table.values()) for s in [*splits, "dropped"]}
    lines.append("| **all** | " + " | ".join(f"**{totals[s]}**" for s in splits) +
                 f" | **{totals['dropped']}** | **{sum(totals.values())}** |")
    reasons = dropped_by_reason(rows)
    lines += ["", "Dropped sites by reason" + (":" if reasons else ": none."), ""]
    lines += [f"- {reason}: {count}" for reason, count in reasons.items()]
    lines += ["", "## Per-band statistics", "",
              ("Of the valid pixels of the training split, in physical units (what `scale_factor` gives); "
              "the store keeps them as each group's `normalization` attribute."), "",
              "| sensor | band | mean | std | pixels |", "|---|---|---|---|---|"]
    for s in images:
        norm = s.normalization or {}
        for k, band in enumerate(s.bands):
            mean, std = (norm.get("mean") or [None] * len(s.bands))[k], (norm.get("std") or [None] * len(s.bands))[k]
            lines.append(f"| {s.name} | {band} | {_num(mean)} | {_num(std)} | {norm.get('pixels', '-')} |")
    lines += ["", "## Provenance and rebuilding", "",
              f"- xstars {__version__}, store layout version {LAYOUT_VERSION}",
              f"- manifest `{paths['manifest']}`: SHA-256 `{hashes['manifest']}`",
              (f"- build config `{paths['build_config']}` (the resolved config sections the build read): "
              f"SHA-256 `{hashes['config']}` of its canonical JSON"),
              f"- store fingerprint (SHA-256 of the shard checksums recorded at build time): `{hashes['store']}`",
              "",
              ("The manifest pins every scene (item id, asset keys, fallbacks) and, by SHA-256, the files of its "
               "unsigned STAC items beside it (`<manifest stem>.items/`, stac-geoparquet): a build from them "
               "(frozen mode) makes no catalogue search and stores the same bytes. With the same xstars, from "
               "this card's folder:"),
              "", "```bash",
              "snakemake -s <xstars checkout>/Snakefile --directory rebuild --cores 8 build_dataset \\",
              f"    --configfile \"$PWD/{paths['build_config']}\" --config \"catalog={{manifest: $PWD/{paths['manifest']}}}\"",
              "```", "",
              ("`build_dataset` verifies the rebuilt store (`xstars build verify`: every site, every shard against "
               "its checksum) and publishes its card: its store fingerprint equals the one above."), "",
              "## Licences and attribution", "",
              "Each source keeps its own licence; a reuse of this dataset must credit every source as below.", ""]
    for s in sensors:
        for collection in s.collections:
            entry = licences[collection]
            years = ", ".join(map(str, s.years)) or "-"
            lines += [f"### {s.name}: {collection}", "",
                      f"- provider: {entry['provider']} ({entry['provider_url']})",
                      f"- licence: [{entry['licence']}]({entry['licence_url']})"
                      + (f" (SPDX `{entry['spdx']}`)" if entry.get("spdx") else ""),
                      f"- attribution: {entry['attribution'].format(years=years)}",
                      f"- terms: {entry['terms']}"]
            if entry.get("citation"):
                lines.append(f"- cite: {entry['citation']}")
            lines.append("")
    lines += ["## How to cite", "", "```bibtex", publish["cite_as"], "```", "",
              "## Loading", "", "```python",
              "import xarray as xr",
              f"tiles = xr.open_zarr(\"{paths['store']}\", group=\"{images[0].name if images else sensors[0].name}\")",
              "```", "",
              ("or, in PyTorch, `xstars.torch_dataset.StoreDataset` (one sample = every sensor's tile, validity, CRS "
              "and bounds)."), ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


# ==================================================================================== STAC


def footprint_wgs84(bounds: Sequence[float], crs: str, points_per_side: int = 4):
    """The footprint polygon in WGS84 (edges densified: a straight edge in the store's CRS is
    curved in longitude/latitude)."""
    from pyproj import Transformer
    from shapely.geometry import Polygon

    xmin, ymin, xmax, ymax = bounds
    t = np.linspace(0, 1, points_per_side + 1)[:-1]
    ring = ([(xmin + (xmax - xmin) * f, ymin) for f in t] + [(xmax, ymin + (ymax - ymin) * f) for f in t]
            + [(xmax - (xmax - xmin) * f, ymax) for f in t] + [(xmin, ymax - (ymax - ymin) * f) for f in t])
    transformer = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = transformer.transform([p[0] for p in ring], [p[1] for p in ring])
    return Polygon([(round(x, 7), round(y, 7)) for x, y in zip(lon, lat, strict=True)])


def build_stac(meta: Mapping[str, Any], sensors: Sequence[SensorFacts], rows: Sequence[Mapping[str, Any]],
               licences: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], source_links: Mapping[str, str],
               store_href: str):
    """The STAC collection of the store (pystac objects, hrefs not yet set) and its items.

    ``store_href``: the store relative to the collection file. ``source_links``: collection ->
    URL template of a source item (``{id}``), for the collections searched through a STAC API.
    """
    import pystac
    from shapely.geometry import mapping

    publish = config["publish"]
    crs = meta["crs"]
    kept = [r for r in rows if r["status"] == "ok"]
    if not kept:
        raise DataError("no kept sample: nothing to describe in STAC")
    footprints = {r["site_id"]: footprint_wgs84((r["xmin"], r["ymin"], r["xmax"], r["ymax"]), crs) for r in kept}
    lon_lat = np.array([f.bounds for f in footprints.values()])
    bbox = [float(lon_lat[:, 0].min()), float(lon_lat[:, 1].min()), float(lon_lat[:, 2].max()),
            float(lon_lat[:, 3].max())]
    dates = sorted(d for s in sensors for d in (s.first_date, s.last_date) if d)
    extent = pystac.Extent(pystac.SpatialExtent([bbox]),
                           pystac.TemporalExtent([[_datetime(dates[0]), _datetime(dates[-1])]]))
    used = [licences[c] for s in sensors for c in s.collections]
    providers = [pystac.Provider(e["provider"], roles=[pystac.ProviderRole.PRODUCER, pystac.ProviderRole.LICENSOR],
                                 url=e["provider_url"]) for e in _unique(used, "provider")]
    providers.append(pystac.Provider("xstars", description=f"rebuilt with xstars {__version__}",
                                     roles=[pystac.ProviderRole.PROCESSOR]))
    collection = pystac.Collection(
        id=publish["collection_id"], title=publish["title"], description=publish["description"], extent=extent,
        license="other", providers=providers, stac_extensions=list(STAC_EXTENSIONS.values()),
        extra_fields={"xstars:layout_version": LAYOUT_VERSION, "xstars:samples": len(rows),
                      "xstars:kept": len(kept), "xstars:footprint_m": meta["footprint_m"]})
    for entry in _unique(used, "licence_url"):
        collection.add_link(pystac.Link("license", entry["licence_url"], media_type="text/html",
                                        title=entry["licence"]))
    if publish["url"]:
        collection.add_link(pystac.Link("about", publish["url"], title=publish["title"]))
    collection.summaries = pystac.Summaries({"gsd": sorted({s.gsd_m for s in sensors}),
                                             "xstars:sensors": [s.name for s in sensors],
                                             "proj:code": [crs]})
    collection.add_asset("store", pystac.Asset(store_href, title="The Zarr store (one group per sensor)",
                                               media_type=ZARR_MEDIA_TYPE, roles=["data"]))
    for s in sensors:
        collection.add_asset(s.name, pystac.Asset(f"{store_href}/{s.name}", title=f"{s.name}: {s.long_name}",
                                                  media_type=ZARR_MEDIA_TYPE, roles=["data"],
                                                  extra_fields=_cube_fields(s, len(rows))))
    items = []
    for r in kept:
        geometry = footprints[r["site_id"]]
        times = sorted(r[f"{s.name}_date"] for s in sensors if r[f"{s.name}_date"])
        item = pystac.Item(
            id=r["site_id"], geometry=mapping(geometry), bbox=list(geometry.bounds), datetime=None,
            start_datetime=_datetime(times[0]), end_datetime=_datetime(times[-1]), collection=collection.id,
            stac_extensions=[STAC_EXTENSIONS["projection"]],
            properties={"proj:code": crs, "proj:bbox": [r["xmin"], r["ymin"], r["xmax"], r["ymax"]],
                        "xstars:sample": r["sample"], "xstars:split": r["split"], "xstars:region": r["region"],
                        "xstars:source_items": {s.name: r[f"{s.name}_item_id"] for s in sensors}})
        for s in sensors:
            dx = (r["xmax"] - r["xmin"]) / s.tile_px
            item.add_asset(s.name, pystac.Asset(
                f"../{store_href}/{s.name}", title=f"{s.name} of sample {r['sample']} (index `sample`)",
                media_type=ZARR_MEDIA_TYPE, roles=["data"],
                extra_fields={"datetime": _datetime(r[f"{s.name}_date"]).strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "gsd": s.gsd_m, "proj:shape": [s.tile_px, s.tile_px],
                              "proj:transform": [dx, 0.0, r["xmin"], 0.0, -dx, r["ymax"], 0.0, 0.0, 1.0],
                              "xstars:source_item": r[f"{s.name}_item_id"]}))
            template = next((source_links[c] for c in s.collections if c in source_links), None)
            if template:
                item.add_link(pystac.Link("derived_from", template.format(id=r[f"{s.name}_item_id"]),
                                          media_type="application/geo+json", title=f"{s.name} source item"))
        items.append(item)
    return collection, items


def _cube_fields(s: SensorFacts, samples: int) -> dict[str, Any]:
    """Datacube fields of one sensor's group: its dimensions and variables."""
    unit = {"unit": s.units} if s.units else {}
    return {
        "gsd": s.gsd_m,
        "cube:dimensions": {
            "sample": {"type": "sample", "extent": [0, samples - 1], "step": 1,
                       "description": "one site; sample i is the same site in every group (per-sample transform)"},
            "band": {"type": "bands", "values": list(s.bands)},
            "y": {"type": "pixel", "extent": [0, s.tile_px - 1], "step": 1,
                  "description": f"row of the tile's own grid ({s.gsd_m:g} m), top to bottom"},
            "x": {"type": "pixel", "extent": [0, s.tile_px - 1], "step": 1,
                  "description": f"column of the tile's own grid ({s.gsd_m:g} m), left to right"},
        },
        "cube:variables": {
            "data": {"dimensions": ["sample", "band", "y", "x"], "type": "data",
                     "description": f"{s.long_name}, {s.dtype}" + (f" x scale_factor {s.scale_factor:.6g}"
                                                                   if s.scale_factor != 1 else ""), **unit},
            "valid": {"dimensions": ["sample", "y", "x"], "type": "auxiliary",
                      "description": "1 where the pixel is usable (not cloud, shadow or no data)"},
            "transform": {"dimensions": ["sample", "affine"], "type": "auxiliary",
                          "description": "GDAL geotransform of the tile's grid, in the store's CRS"},
        },
    }


def _datetime(text: str):
    import datetime as dt

    return dt.datetime.fromisoformat(text)


def _unique(entries: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    seen: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        seen.setdefault(entry[key], entry)
    return list(seen.values())


def stac_validator():
    """A pystac validator that needs no network: STAC core and GeoJSON schemas from pystac, the
    extensions' from ``xstars/resources/stac_schemas`` (see its README)."""
    from pystac.validation import JsonSchemaSTACValidator

    validator = JsonSchemaSTACValidator()
    folder = resources.files("xstars").joinpath("resources", "stac_schemas")
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            schema = json.loads(entry.read_text(encoding="utf-8"))
            validator.schema_cache[schema["$id"].rstrip("#")] = schema
    return validator


def validate_stac(collection_path: Path) -> int:
    """Validate the collection and every item under it (offline); returns how many were checked.
    Raises DataError naming the first invalid object."""
    import pystac
    from pystac.errors import STACValidationError

    validator = stac_validator()
    collection = pystac.Collection.from_file(str(collection_path))
    objects = [collection, *collection.get_items(recursive=True)]
    for obj in objects:
        try:
            pystac.validation.validate(obj, validator=validator)
        except STACValidationError as err:
            raise DataError(f"{obj.get_self_href()}: not valid STAC ({str(err).splitlines()[0]})") from None
    return len(objects)


# =============================================================================== Croissant


#: The JSON-LD context of Croissant 1.0 (as mlcroissant writes it).
CROISSANT_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "citeAs": "cr:citeAs", "column": "cr:column",
    "conformsTo": "dct:conformsTo", "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/", "equivalentProperty": "cr:equivalentProperty", "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract",
    "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet",
    "format": "cr:format", "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath",
    "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path", "recordSet": "cr:recordSet",
    "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated", "replace": "cr:replace",
    "samplingRate": "cr:samplingRate", "sc": "https://schema.org/", "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField",
    "transform": "cr:transform",
}


def build_croissant(sensors: Sequence[SensorFacts], rows: Sequence[Mapping[str, Any]],
                    licences: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], files: Mapping[str, Any],
                    ) -> dict[str, Any]:
    """Croissant metadata: the store's files and the ``samples`` record set (one record per sample,
    read from samples.csv). ``files``: name -> (relative path, sha256) of samples.csv and the
    store's root metadata."""
    publish = config["publish"]
    csv_id = "samples-csv"
    fields = [("sample", "sc:Integer", "sample index in every group of the store"),
              ("site_id", "sc:Text", "site id, <city>_<col>_<row>"), ("region", "sc:Text", "city"),
              ("split", "sc:Text", "train, val or test (whole cities or blocks)"),
              ("status", "sc:Text", "ok, or dropped: <reason>"),
              *((k, "sc:Float", f"footprint {k} in the store's CRS") for k in ("xmin", "ymin", "xmax", "ymax"))]
    for s in sensors:
        fields += [(f"{s.name}_date", "sc:Text", f"acquisition time of {s.name} (ISO 8601)"),
                   (f"{s.name}_item_id", "sc:Text", f"source item of {s.name} ({', '.join(s.collections) or 'import'})")]
    used = [licences[c] for s in sensors for c in s.collections]
    doc = {
        "@context": CROISSANT_CONTEXT, "@type": "sc:Dataset", "name": publish["collection_id"],
        "description": publish["title"] + ". " + publish["description"],
        "conformsTo": "http://mlcommons.org/croissant/1.0", "citeAs": publish["cite_as"],
        "license": [e["licence_url"] for e in _unique(used, "licence_url")],
        "url": publish["url"] or files["card"][0], "version": f"{__version__}+layout{LAYOUT_VERSION}",
        "keywords": ["earth observation", "multi-sensor", "self-supervised learning", "remote sensing", "France",
                     *(s.name for s in sensors)],
        "distribution": [
            {"@type": "cr:FileObject", "@id": csv_id, "name": "samples.csv", "contentUrl": files["samples"][0],
             "encodingFormat": "text/csv", "sha256": files["samples"][1],
             "description": "one row per sample of the store"},
            {"@type": "cr:FileObject", "@id": "store-metadata", "name": "dataset.zarr/zarr.json",
             "contentUrl": files["store_metadata"][0], "encodingFormat": "application/json",
             "sha256": files["store_metadata"][1],
             "description": "consolidated metadata of the Zarr store (arrays, attributes, normalisation statistics)"},
            {"@type": "cr:FileSet", "@id": "store-shards", "name": "dataset.zarr shards",
             "encodingFormat": ZARR_MEDIA_TYPE, "includes": files["store_glob"],
             "description": "the Zarr v3 store: per sensor group, data (sample, band, y, x), valid (sample, y, x) and "
                            "the per-sample arrays; one inner chunk per sample"},
        ],
        "recordSet": [{
            "@type": "cr:RecordSet", "@id": "samples", "name": "samples",
            "description": "the samples of the store; the pixels of sample i are index i of each group's arrays",
            "key": {"@id": "samples/site_id"},
            "field": [{"@type": "cr:Field", "@id": f"samples/{name}", "name": name, "description": text,
                       "dataType": kind, "source": {"fileObject": {"@id": csv_id}, "extract": {"column": name}}}
                      for name, kind, text in fields],
        }],
    }
    return doc


# ================================================================================= publish


def build_config_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config sections the build read, as a file `snakemake --configfile` takes back (the
    world's overlay is already applied: it is emptied so that it is not applied twice)."""
    sections = {key: config[key] for key in BUILD_SECTIONS}
    return {**sections, "worlds": {config["world"]: {}}}


def source_item_links(config: Mapping[str, Any], catalogs: Mapping[str, Mapping[str, Any]],
                      searched: set[str]) -> dict[str, str]:
    """Collection -> URL template (``{id}``) of its items, for the collections searched through a
    STAC API (the catalogue URLs as the manifest recorded them)."""
    links = {}
    for sensor in config["sensors"].values():
        catalog = catalogs.get(sensor["catalog"], {})
        if catalog.get("kind") == "stac" and sensor["collection"] in searched:
            links[sensor["collection"]] = f"{catalog['url'].rstrip('/')}/collections/{sensor['collection']}/items/{{id}}"
    return links


def publish(store: Path | str, manifest_path: Path | str, config: Mapping[str, Any], out_dir: Path | str,
            validate: bool = True) -> dict[str, Any]:
    """Write the card, build config, samples table, STAC and Croissant of ``store`` in ``out_dir``.

    Returns what was written and the hashes. Raises DataError when a source has no licence
    recorded, or (``validate``) when the STAC written is not valid."""
    import pystac

    from xstars.manifest import Manifest

    store, manifest_path, out_dir = Path(store), Path(manifest_path), Path(out_dir)
    root = open_store(store)
    opened = Manifest(manifest_path)
    manifest = opened.frame()
    meta = root.attrs["xstars"]
    sensors = describe_sensors(root, manifest)
    licences = load_licences()
    missing = sorted({c for s in sensors for c in s.collections if c not in licences})
    if missing:
        raise DataError(f"source collections {missing} have no licence in xstars/resources/licences.yaml: "
                        "add each with its provider's licence and attribution before publishing")
    rows = sample_rows(root, sensors)
    out_dir.mkdir(parents=True, exist_ok=True)

    build_config = build_config_of(config)
    (out_dir / BUILD_CONFIG).write_text(yaml.safe_dump(build_config, sort_keys=True, allow_unicode=True))
    _write_csv(rows, out_dir / SAMPLES_CSV)
    hashes = {"manifest": file_sha256(manifest_path), "config": config_sha256(build_config),
              "store": store_fingerprint(root)}
    paths = {name: _relative(path, out_dir) for name, path in {
        "store": store, "manifest": manifest_path, "build_config": out_dir / BUILD_CONFIG,
        "stac": out_dir / STAC_DIR / "collection.json", "croissant": out_dir / CROISSANT,
        "samples": out_dir / SAMPLES_CSV}.items()}
    (out_dir / CARD).write_text(render_card(meta, sensors, rows, licences, hashes, config, paths), encoding="utf-8")

    stac_dir = out_dir / STAC_DIR
    if stac_dir.exists():  # items of sites no longer stored must not linger
        shutil.rmtree(stac_dir)
    provenance = opened.provenance
    searched = {s["collection"] for s in provenance.get("searches", [])}
    source_links = source_item_links(config, provenance.get("catalogs", {}), searched)
    collection, items = build_stac(meta, sensors, rows, licences, config, source_links,
                                   _relative(store, stac_dir))
    collection.add_items(items)
    collection.normalize_hrefs(str(stac_dir.resolve()))
    collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    checked = validate_stac(stac_dir / "collection.json") if validate else 0

    files = {"samples": (SAMPLES_CSV, file_sha256(out_dir / SAMPLES_CSV)),
             "store_metadata": (f"{paths['store']}/zarr.json", file_sha256(store / "zarr.json")),
             "store_glob": f"{paths['store']}/**", "card": (CARD, "")}
    croissant = build_croissant(sensors, rows, licences, config, files)
    (out_dir / CROISSANT).write_text(json.dumps(croissant, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("publish %s: card, %d STAC objects (validated: %d), croissant", out_dir, len(items) + 1, checked)
    return {"card": str(out_dir / CARD), "stac": str(stac_dir / "collection.json"), "croissant": str(
        out_dir / CROISSANT), "items": len(items), "validated": checked, **{f"sha256_{k}": v for k, v in hashes.items()}}


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _where(root) -> str:
    return str(getattr(root.store, "root", root.store))
