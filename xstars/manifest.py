"""Manifest: the exact items and choices of a build, in files made to be read in pieces.

The catalog stage ends with a manifest and, beside it, its items::

    manifest.parquet                  GeoParquet, one row per (site, sensor) (:class:`ManifestRow`),
                                      sites in site-id order (the store's sample order). Row group k
                                      holds the sites of build part k (``build.samples_per_shard``
                                      each), so a build job decodes its own rows and nothing else
                                      (:meth:`Manifest.part`). Rows name their items by id. The
                                      footer holds the provenance (config sections, every search)
                                      and pins every items file by SHA-256.
    manifest.items/<sensor>.parquet   stac-geoparquet (written by rustac): every item the rows name
                                      (chosen scenes, fallbacks, the members of label mosaics), once
                                      each, unsigned, sorted by id in row groups of
                                      :data:`ITEMS_PER_ROW_GROUP`; a job reads only the row groups
                                      holding its ids (:class:`ItemsFile`).

Why: one Sentinel-2 item covers the sites of a whole 110 km tile. Embedded in every row (as the
first layout did) it was copied thousands of times at France size, and every build job decoded
all of France before its first request (8.5 GB). Search shards write the same two kinds of file,
candidates (:class:`Candidate`) and items, which the manifest job merges
(:func:`xstars.catalog.merge_manifest`) one group of sites at a time.

A manifest of the first layout (item JSON in ``item_json``/``fallbacks_json`` columns) is refused
with the command that converts it (:func:`convert_manifest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xstars import items as stac_items
from xstars.errors import DataError

#: The manifest layout this code writes and reads (1: item JSON embedded in every row).
MANIFEST_LAYOUT = 2

#: Items per row group of an items file: a build job reads whole row groups, so small enough that
#: a part's few dozen scenes do not drag in a whole collection, large enough for a small footer.
ITEMS_PER_ROW_GROUP = 256

#: Why a site is dropped: code -> what it means (the row's ``reason`` adds the figures).
DROP_CODES: dict[str, str] = {
    "no_item": "no item covers the footprint in the searched windows",
    "no_full_cover": "no single item covers the whole footprint",
    "too_invalid": "every scene has too much of the footprint cloudy or without data",
    "no_usable_scene": "no chosen scene or fallback was readable and clear enough at build time",
}


# ==================================================================================== rows


class Candidate(NamedTuple):
    """One item found for one site and sensor by a search, with its figures over the footprint.

    A typed, immutable tuple rather than a frozen dataclass: the manifest job makes millions of
    them at France size, and a frozen dataclass takes four times as long to build."""

    site_id: str
    sensor: str
    item_id: str
    collection: str
    window: str  # the season window ("-" for labels, the campaign year for WMS layers)
    datetime: str
    eo_cloud_cover: float | None
    cloud_fraction: float
    nodata_fraction: float
    invalid_fraction: float
    rank_last: bool = False  # an item rule ranks it after every other (Landsat Tier 2)


@dataclass(frozen=True)
class Fallback:
    """A scene tried, in order, when the chosen one proves unusable at build time."""

    item_id: str
    datetime: str
    cloud_fraction: float
    nodata_fraction: float
    invalid_fraction: float


@dataclass(frozen=True)
class DropReason:
    """Why a site is dropped: the sensor that lacks a scene, a :data:`DROP_CODES` code, and the
    sentence with its figures (as logs and the dataset card show it)."""

    sensor: str
    code: str
    text: str

    def __post_init__(self) -> None:
        if self.code not in DROP_CODES:
            raise ValueError(f"unknown drop reason code {self.code!r}")

    @property
    def key(self) -> str:
        """What drops are counted by (summaries, the report)."""
        return f"{self.sensor}: {DROP_CODES[self.code]}"


@dataclass(frozen=True)
class ManifestRow:
    """The choice for one site and sensor: the item (by id) and its fallbacks, or why none."""

    site_id: str
    region: str
    split: str
    col: int
    row: int
    footprint_m: float
    sensor: str
    status: str  # "ok", or "dropped" (every row of the site, whichever sensor lacked a scene)
    reason: str  # the sentence ("" when kept)
    reason_code: str  # DROP_CODES key ("" when kept)
    reason_sensor: str
    collection: str
    item_id: str
    datetime: str
    eo_cloud_cover: float | None
    cloud_fraction: float | None
    nodata_fraction: float | None
    invalid_fraction: float | None
    assets: tuple[str, ...]
    fallbacks: tuple[Fallback, ...]
    n_candidates: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        f = self.footprint_m
        return (self.col * f, self.row * f, (self.col + 1) * f, (self.row + 1) * f)

    @property
    def item_ids(self) -> tuple[str, ...]:
        """The chosen item then the fallbacks, in the order the build tries them."""
        return ((self.item_id,) if self.item_id else ()) + tuple(f.item_id for f in self.fallbacks)

    @property
    def drop_reason(self) -> DropReason | None:
        return DropReason(self.reason_sensor, self.reason_code, self.reason) if self.reason_code else None


_FALLBACK_TYPE = pa.struct([("item_id", pa.string()), ("datetime", pa.string()), ("cloud_fraction", pa.float64()),
                            ("nodata_fraction", pa.float64()), ("invalid_fraction", pa.float64())])
_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), float | None: pa.float64(),
                bool: pa.bool_(), tuple[str, ...]: pa.list_(pa.string()), tuple[Fallback, ...]: pa.list_(_FALLBACK_TYPE)}


def _schema(cls: type) -> pa.Schema:
    import typing

    hints = typing.get_type_hints(cls)
    names = cls._fields if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]
    return pa.schema([(name, _ARROW_TYPES[hints[name]]) for name in names])


CANDIDATE_SCHEMA = _schema(Candidate)
ROW_SCHEMA = _schema(ManifestRow)
#: Columns a manifest has (checked when one is opened), the footprint polygon last.
MANIFEST_COLUMNS: tuple[str, ...] = (*ROW_SCHEMA.names, "geometry")


def row_from_record(record: Mapping[str, Any]) -> ManifestRow:
    """A manifest row from its record (a row of :data:`ROW_SCHEMA` as a dict)."""
    record = {k: v for k, v in record.items() if k != "geometry"}
    return ManifestRow(**{**record, "assets": tuple(record["assets"]),
                          "fallbacks": tuple(Fallback(**f) for f in record["fallbacks"])})


def _columns(rows: Sequence[Any], schema: pa.Schema) -> dict[str, list]:
    columns: dict[str, list] = {name: [getattr(row, name) for row in rows] for name in schema.names}
    if "fallbacks" in columns:  # structs from the frozen dataclasses, by hand: asdict deep-copies
        columns["fallbacks"] = [[{"item_id": f.item_id, "datetime": f.datetime, "cloud_fraction": f.cloud_fraction,
                                  "nodata_fraction": f.nodata_fraction, "invalid_fraction": f.invalid_fraction}
                                 for f in value] for value in columns["fallbacks"]]
    return columns


# ============================================================================== candidates


class CandidatesWriter:
    """A search shard's candidates (Parquet, one row group per search group, as it goes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_suffix(".tmp")
        self._writer = pq.ParquetWriter(self._tmp, CANDIDATE_SCHEMA, compression="zstd")
        self.count = 0

    def write(self, candidates: Sequence[Candidate]) -> None:
        ordered = sorted(candidates, key=lambda c: (c.site_id, c.sensor, c.item_id, c.window))
        self._writer.write_table(pa.table(_columns(ordered, CANDIDATE_SCHEMA), schema=CANDIDATE_SCHEMA))
        self.count += len(ordered)

    def close(self) -> Path:
        self._writer.close()
        self._tmp.replace(self.path)
        return self.path


_SHARED_STRINGS = ["sensor", "item_id", "collection", "window", "datetime"]
_CANDIDATE_COLUMNS = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if f.name in _SHARED_STRINGS
                                else f for f in CANDIDATE_SCHEMA])


def read_candidates(paths: Iterable[Path]) -> list[Candidate]:
    """Every candidate of the given shard files (for tests and small worlds: the manifest job
    takes them a group of sites at a time, :func:`candidates_table`, :func:`candidates_in`)."""
    table = candidates_table(paths)
    return candidates_in(table, 0, table.num_rows)


def candidates_in(table: pa.Table, start: int, stop: int) -> list[Candidate]:
    """Rows ``start:stop`` of a :func:`candidates_table` as candidates."""
    chunk = table.slice(start, stop - start)
    columns = [(chunk.column(name).cast(pa.string()) if name in _SHARED_STRINGS else chunk.column(name)).to_pylist()
               for name in CANDIDATE_SCHEMA.names]
    return [Candidate(*values) for values in zip(*columns, strict=True)]


def candidates_table(paths: Iterable[Path]) -> pa.Table:
    """The candidates of every shard as one table (Arrow columns, no Python rows;
    the strings sites share dictionary-encoded: some 70 B a candidate)."""
    tables = []
    for path in paths:
        try:  # strings dictionary-encoded: a scene's id, date, window are shared by its sites
            tables.append(pq.read_table(path, read_dictionary=_SHARED_STRINGS).cast(_CANDIDATE_COLUMNS))
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{path}: not a candidates file of a search shard ({err})") from None
    table = pa.concat_tables(tables) if tables else _CANDIDATE_COLUMNS.empty_table()
    # In shard order (a site's candidates all come from the shard that searched its group):
    # the selection orders a site's candidates itself.
    return table.unify_dictionaries()


# =================================================================================== items


def items_dir(path: Path) -> Path:
    """Where the items of a manifest or of a shard's candidates live: ``<stem>.items/`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".items")


def write_items(items: Iterable[Mapping[str, Any]], path: Path) -> dict[str, Any] | None:
    """Write items (unique by id) as stac-geoparquet, sorted by id in row groups; returns the
    file's pin (name, SHA-256, count), or None when there is no item (no file is written).

    rustac writes the stac-geoparquet table; it is rewritten with pyarrow only to cut it into
    row groups of :data:`ITEMS_PER_ROW_GROUP` (rustac writes one), schema and metadata unchanged."""
    import rustac

    by_id = {}
    for item in items:  # a mosaic's members, as a read attaches them, are stored as items of their own
        by_id.setdefault(item["id"], {k: v for k, v in item.items() if k != MOSAIC_KEY})
    if not by_id:
        return None
    ordered = [by_id[key] for key in sorted(by_id)]
    for item in ordered:
        _check_unsigned(item, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".rustac.parquet")
    rustac.write_sync(str(tmp), ordered)
    table = _read_items_table(tmp)
    tmp.unlink()
    return _write_items_table(table, path)


def _read_items_table(path: Path) -> pa.Table:
    return _items_table(pq.ParquetFile(path))


def _items_table(source: pq.ParquetFile) -> pa.Table:
    metadata = {k: v for k, v in (source.metadata.metadata or {}).items() if k != b"ARROW:schema"}
    return source.read().replace_schema_metadata(metadata)


def _write_items_table(table: pa.Table, path: Path) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=ITEMS_PER_ROW_GROUP, compression="zstd")
    tmp.replace(path)
    return {"path": path.name, "sha256": file_sha256(path), "items": table.num_rows}


def _check_unsigned(item: Mapping[str, Any], path: Path) -> None:
    for key, asset in item.get("assets", {}).items():
        href = asset.get("href", "")
        if "?" in href and stac_items.looks_signed(href):
            raise DataError(f"{path}: item {item['id']!r} asset {key!r} has a signed URL; items are stored unsigned")


def merge_items(sources: Sequence[Path], wanted: set[str], path: Path) -> dict[str, Any] | None:
    """The items of ``wanted`` (and the members of the label mosaics among them) from the
    shards' items files of one sensor, once each, into one items file.

    Arrow only, no Python item, one shard at a time: each shard's table is filtered to the ids
    still missing (the first shard's copy wins: shards read the same service; a scene searched
    by many shards is held once), then the pieces are put together (their schemas differ where
    items differ, hence the permissive promotion) and sorted by id."""
    pieces, missing, metadata = [], set(wanted), None
    for source in sources:
        if not missing or not source.exists():
            continue
        # The shard's ids first (one column): a shard with nothing new is read no further, and
        # the filter is built from what this shard holds, not from all that is still missing.
        # The file is opened once: a STAC collection's footer names hundreds of columns.
        file = pq.ParquetFile(source)
        here = set(file.read(columns=["id"]).column("id").to_pylist()) & missing
        if not here:
            continue
        table = _items_table(file)
        metadata = metadata or table.schema.metadata
        chosen = table.filter(pc.is_in(table.column("id"), pa.array(sorted(here), pa.string())))
        if MOSAIC_KEY in chosen.column_names:  # a mosaic's members are stored in the same shard, read with it
            members = {m for ms in chosen.column(MOSAIC_KEY).to_pylist() if ms for m in ms} - set(wanted)
            if members:
                wanted = wanted | members
                missing |= members
                here |= members
                chosen = table.filter(pc.is_in(table.column("id"), pa.array(sorted(here), pa.string())))
        del table
        pieces.append(chosen)
        missing -= set(chosen.column("id").to_pylist())
    if missing:
        raise DataError(f"items {sorted(missing)[:5]} are referenced but in no shard's items file ({path.name})")
    if not pieces:
        return None
    table = pa.concat_tables(pieces, promote_options="permissive").sort_by("id")
    return _write_items_table(table.replace_schema_metadata(metadata), path)


#: Where a label mosaic (:func:`xstars.catalog.mosaic_item`) names its members, in ``properties``.
MOSAIC_KEY = "xstars:mosaic"


class ItemsFile:
    """One sensor's items file, read by row group: :meth:`get` decodes only the row groups whose
    id range (from the footer's statistics; ids are sorted) holds an asked id."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"items file {self.path} does not exist (it goes beside its manifest)")
        self.file = pq.ParquetFile(self.path)
        column = self.file.schema_arrow.get_field_index("id")
        self.ranges: list[tuple[str, str] | None] = []
        for group in range(self.file.num_row_groups):
            stats = self.file.metadata.row_group(group).column(column).statistics
            self.ranges.append((stats.min, stats.max) if stats is not None and stats.has_min_max else None)

    def get(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The items of ``ids`` (a mosaic with its members under ``xstars:mosaic``, as the
        acquisition reads it); DataError naming the file for an id it does not hold."""
        import rustac

        asked = list(ids)
        wanted, found = set(asked), {}
        while wanted - set(found):
            ask = wanted - set(found)
            groups = [g for g, r in enumerate(self.ranges) if r is None or any(r[0] <= i <= r[1] for i in ask)]
            for group in groups:
                table = self.file.read_row_group(group)
                table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(ask), pa.string())))
                if table.num_rows:
                    for item in rustac.from_arrow(table)["features"]:
                        found[item["id"]] = item
            missing = ask - set(found)
            if missing:
                raise DataError(f"{self.path}: no item {min(missing)!r} (the manifest names it)")
            wanted |= {m for i in found.values() for m in i["properties"].get(MOSAIC_KEY) or ()}
        for item in found.values():
            members = item["properties"].get(MOSAIC_KEY)
            if members:
                item[MOSAIC_KEY] = [found[m] for m in members]
        return {i: found[i] for i in asked}


# ================================================================================ manifest


class ManifestWriter:
    """Writes a manifest one site at a time: a row group every ``sites_per_row_group`` sites
    (the build's samples per shard), then its items files and the footer that pins them."""

    def __init__(self, path: Path, crs: str, provenance: Mapping[str, Any], sites_per_row_group: int) -> None:
        from pyproj import CRS

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sites_per_row_group = int(sites_per_row_group)
        geo = {"version": "1.0.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                        "crs": CRS.from_user_input(crs).to_json_dict()}}}
        self.schema = ROW_SCHEMA.append(pa.field("geometry", pa.binary())).with_metadata(
            {b"geo": json.dumps(geo).encode()})
        self._provenance = dict(provenance)
        self._tmp = self.path.with_suffix(".tmp")
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._pending: list[ManifestRow] = []
        self._pending_sites = 0
        self._partial_written = False
        self.sites = 0
        self.rows = 0
        self.referenced: dict[str, set[str]] = defaultdict(set)

    def add_site(self, rows: Sequence[ManifestRow]) -> None:
        """The rows of the next site (sites must come in site-id order)."""
        for row in rows:
            self.referenced[row.sensor].update(row.item_ids)
        self._pending += rows
        self._pending_sites += 1
        if self._pending_sites == self.sites_per_row_group:
            self._flush()

    def add_sites(self, table: pa.Table, n_sites: int, referenced: Mapping[str, set[str]] | None = None) -> None:
        """The rows of the next ``n_sites`` sites as one table (:data:`ROW_SCHEMA`, every site with
        a row per sensor: what :class:`xstars.selection.TableSelection` makes), cut into row groups
        of ``sites_per_row_group`` sites; only the last call may end in a partial group.
        ``referenced``: the item ids the rows name, by sensor, when the caller knows them."""
        self._flush()
        if self._partial_written:
            raise ValueError("only the last row group of a manifest may hold fewer sites")
        self._partial_written = n_sites % self.sites_per_row_group != 0
        for sensor, ids in (referenced if referenced is not None else referenced_ids(table)).items():
            self.referenced[sensor].update(ids)
        self._write(table, n_sites)

    def _flush(self) -> None:
        if self._pending:
            self._write(pa.table(_columns(self._pending, ROW_SCHEMA), schema=ROW_SCHEMA), self._pending_sites)
        self._pending, self._pending_sites = [], 0

    def _write(self, table: pa.Table, n_sites: int) -> None:
        import numpy as np
        import shapely

        cells = np.stack([table.column(name).to_numpy().astype(np.float64) for name in ("col", "row", "footprint_m")])
        # One polygon per site (its rows, one per sensor, share it), then one per row.
        unique, row_of = np.unique(cells, axis=1, return_inverse=True)
        col, row, side = unique
        x, y = col * side, row * side
        polygons = pa.array(shapely.to_wkb(shapely.box(x, y, x + side, y + side)), pa.binary())
        geometry = polygons.take(pa.array(row_of.ravel()))
        rows_per_site = table.num_rows // max(n_sites, 1)
        self._writer.write_table(table.append_column(self.schema.field("geometry"), geometry).cast(self.schema),
                                 row_group_size=max(rows_per_site * self.sites_per_row_group, 1))
        self.rows += table.num_rows
        self.sites += n_sites

    def close(self, items: Mapping[str, Mapping[str, Any] | None]) -> Path:
        """Finish the file: ``items`` are the pins of the items files written beside it."""
        self._flush()
        layout = {"layout": MANIFEST_LAYOUT, "sites": self.sites, "rows": self.rows,
                  "sites_per_row_group": self.sites_per_row_group,
                  "items": {sensor: pin for sensor, pin in sorted(items.items()) if pin}}
        self._writer.add_key_value_metadata({"xstars": json.dumps(self._provenance, sort_keys=True),
                                             "xstars:manifest": json.dumps(layout, sort_keys=True)})
        self._writer.close()
        self._tmp.replace(self.path)
        return self.path


def referenced_ids(table: pa.Table) -> dict[str, set[str]]:
    """The item ids manifest rows name (chosen and fallbacks), by sensor (Arrow columns: no
    Python row)."""
    sensor = table.column("sensor").combine_chunks()
    item_id = table.column("item_id").combine_chunks()
    fallbacks = table.column("fallbacks").combine_chunks()
    fallback_ids = pc.struct_field(pc.list_flatten(fallbacks), "item_id")
    fallback_sensor = sensor.take(pc.list_parent_indices(fallbacks))
    out: dict[str, set[str]] = defaultdict(set)
    for name in pc.unique(sensor).to_pylist():
        chosen = item_id.filter(pc.and_(pc.equal(sensor, name), pc.not_equal(item_id, "")))
        backs = fallback_ids.filter(pc.equal(fallback_sensor, name))
        out[name] = set(pc.unique(pa.concat_arrays([chosen, backs.cast(chosen.type)])).to_pylist())
    return out


class Manifest:
    """A manifest opened for reading; each reader takes only what it needs:
    :meth:`part` (a build job's rows), :meth:`tables` (row group by row group, chosen columns),
    :meth:`items` (a sensor's items file), :meth:`frame` (everything but the items, for small
    readers: figures, the dataset card)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"manifest {self.path} does not exist (catalog.manifest)")
        try:
            self.file = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{self.path}: not a GeoParquet manifest ({err})") from None
        names = self.file.schema_arrow.names
        if "item_json" in names:
            raise DataError(
                f"{self.path}: a manifest of layout 1 (item JSON in every row), which this version reads no more; "
                f"convert it once with `xstars catalog convert --manifest {self.path} --out NEW.parquet` "
                "(writes NEW.parquet and its items in NEW.items/; the build from it is the same)")
        missing = [c for c in MANIFEST_COLUMNS if c not in names]
        kv = self.file.metadata.metadata or {}
        if missing or b"xstars:manifest" not in kv:
            raise DataError(f"{self.path}: not an xstars manifest, columns {missing} are missing" if missing
                            else f"{self.path}: not an xstars manifest (no xstars:manifest metadata)")
        self.layout = json.loads(kv[b"xstars:manifest"])
        self._provenance = kv.get(b"xstars", b"{}")
        self.n_sites = int(self.layout["sites"])
        self.sites_per_row_group = int(self.layout["sites_per_row_group"])

    @property
    def provenance(self) -> dict[str, Any]:
        """Config sections of the catalog and every search made (what a rebuild needs to know)."""
        return json.loads(self._provenance)

    @property
    def crs(self) -> str:
        from pyproj import CRS

        geo = json.loads(self.file.schema_arrow.metadata[b"geo"])
        return CRS.from_json_dict(geo["columns"]["geometry"]["crs"]).to_string()

    def tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The manifest one row group at a time (only ``columns``, when given)."""
        for group in range(self.file.num_row_groups):
            yield self.file.read_row_group(group, columns=list(columns) if columns else None)

    def site_ids(self) -> list[str]:
        """Every site id in sample order (one column read)."""
        ids: list[str] = []
        for table in self.tables(["site_id"]):
            for site_id in table.column("site_id").to_pylist():
                if not ids or ids[-1] != site_id:
                    ids.append(site_id)
        return ids

    def part(self, part: int, samples_per_shard: int) -> list[list[ManifestRow]]:
        """The sites of build part ``part`` (samples ``part * samples_per_shard`` on), each as its
        rows; only the row groups holding them are decoded."""
        first = part * samples_per_shard
        last = min(first + samples_per_shard, self.n_sites)
        if not 0 <= first < self.n_sites:
            raise DataError(f"part {part} is not in 0..{max(0, -(-self.n_sites // samples_per_shard) - 1)}")
        return self.sites(range(first, last))

    def sites(self, samples: Iterable[int]) -> list[list[ManifestRow]]:
        """The sites at these sample indices (in the order given), each as its rows; only the
        row groups holding them are decoded (a locality group's sites are spread over many)."""
        samples = [int(i) for i in samples]
        outside = [i for i in samples if not 0 <= i < self.n_sites]
        if outside:
            raise DataError(f"{self.path}: samples {outside[:5]} are not in 0..{self.n_sites - 1}")
        per_group = self.sites_per_row_group
        found: dict[int, list[ManifestRow]] = {}
        for group in sorted({i // per_group for i in samples}):
            wanted = {i - group * per_group for i in samples if i // per_group == group}
            offset, previous = -1, None  # a site's rows are consecutive: count site changes
            for record in self.file.read_row_group(group, columns=list(ROW_SCHEMA.names)).to_pylist():
                if record["site_id"] != previous:
                    offset, previous = offset + 1, record["site_id"]
                if offset in wanted:
                    found.setdefault(group * per_group + offset, []).append(row_from_record(record))
        return [found[i] for i in samples]

    def site_cells(self) -> list[tuple[int, int]]:
        """Every site's grid cell ``(col, row)`` in sample order (three columns read): where the
        sites are, for planning reads by locality."""
        cells: list[tuple[int, int]] = []
        last = None
        for table in self.tables(["site_id", "col", "row"]):
            for site_id, col, row in zip(*(table.column(c).to_pylist() for c in ("site_id", "col", "row")),
                                         strict=True):
                if site_id != last:
                    cells.append((int(col), int(row)))
                    last = site_id
        return cells

    def frame(self):
        """The whole manifest as a GeoDataFrame (no item is read)."""
        import geopandas as gpd

        return gpd.read_parquet(self.path)

    def items_path(self, sensor: str) -> Path | None:
        pin = self.layout["items"].get(sensor)
        return items_dir(self.path) / pin["path"] if pin else None

    def items(self, sensor: str) -> ItemsFile:
        path = self.items_path(sensor)
        if path is None:
            raise DataError(f"{self.path}: no items file for sensor {sensor!r}")
        return ItemsFile(path)

    def check_items(self) -> None:
        """Every items file is there with the checksum the manifest pins (frozen mode)."""
        for sensor, pin in self.layout["items"].items():
            path = items_dir(self.path) / pin["path"]
            if not path.exists():
                raise DataError(f"{path}: missing; the manifest {self.path} pins its {sensor} items there")
            if file_sha256(path) != pin["sha256"]:
                raise DataError(f"{path}: SHA-256 differs from the one manifest {self.path} pins; "
                                "the items changed since the catalog ran")

    def subset(self, site_ids: Iterable[str], out: Path) -> Manifest:
        """A manifest of some of the sites (a city of a France-wide catalog run, say) with the
        items they name, at ``out``; the provenance is this one's."""
        keep = set(site_ids)
        rows = [row_from_record(record) for table in self.tables(ROW_SCHEMA.names)
                for record in table.filter(pc.is_in(table.column("site_id"), pa.array(sorted(keep)))).to_pylist()]
        wanted: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            wanted[row.sensor].update(row.item_ids)
        items = {}
        for sensor, ids in wanted.items():
            found = self.items(sensor).get(sorted(ids)) if ids else {}
            members = [m for item in found.values() for m in item.get(MOSAIC_KEY, ())]
            items[sensor] = [*found.values(), *members]
        write_manifest(rows, items, out, self.crs, self.provenance, self.sites_per_row_group)
        return Manifest(out)

    def copy_to(self, out: Path) -> Path:
        """Copy the manifest and its items files, byte for byte (frozen mode)."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != out.resolve():
            shutil.copyfile(self.path, out)
            target = items_dir(out)
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for pin in self.layout["items"].values():
                shutil.copyfile(items_dir(self.path) / pin["path"], target / pin["path"])
        return out


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read a MiB at a time (items files, shards, the dataset card's files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(rows: Sequence[ManifestRow], items: Mapping[str, Iterable[Mapping[str, Any]]], path: Path,
                   crs: str, provenance: Mapping[str, Any], sites_per_row_group: int) -> Path:
    """Write a manifest and its items at once (rows in site order): for conversions and tests;
    the manifest job streams (:func:`xstars.catalog.merge_manifest`)."""
    writer = ManifestWriter(path, crs, provenance, sites_per_row_group)
    by_site: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_site[row.site_id].append(row)
    for site_id in sorted(by_site):
        writer.add_site(by_site[site_id])
    target = items_dir(path)
    if target.exists():
        shutil.rmtree(target)
    pins = {}
    for sensor, sensor_items in items.items():
        chosen = [i for i in sensor_items if i["id"] in writer.referenced[sensor]]
        pins[sensor] = write_items(_with_members(chosen, sensor_items), target / f"{sensor}.parquet")
    return writer.close(pins)


def _with_members(chosen: list[Mapping[str, Any]], pool: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    members = {m for i in chosen for m in i["properties"].get(MOSAIC_KEY) or ()}
    return chosen + [i for i in pool if i["id"] in members] if members else chosen


def convert_manifest(old: Path, out: Path, sites_per_row_group: int) -> Path:
    """A layout-1 manifest (item JSON in ``item_json`` and ``fallbacks_json``) as a manifest of
    this layout (rows by item id, items once in ``<out>.items/``): what is built from it is the
    same. The old file is read whole, as its layout requires."""
    import geopandas as gpd

    frame = gpd.read_parquet(old)
    if "item_json" not in frame.columns:
        raise DataError(f"{old}: not a layout-1 manifest (no item_json column); nothing to convert")
    provenance = json.loads((pq.ParquetFile(old).metadata.metadata or {}).get(b"xstars", b"{}"))
    items: dict[str, dict[str, dict]] = defaultdict(dict)
    rows = []
    for record in frame.drop(columns="geometry").to_dict("records"):
        fallbacks = json.loads(record.pop("fallbacks_json") or "[]")
        item_json = record.pop("item_json")
        for text in [item_json, *(f["item_json"] for f in fallbacks)]:
            if text:
                item = json.loads(text)
                for member in item.pop(MOSAIC_KEY, None) or ():
                    items[record["sensor"]].setdefault(member["id"], member)
                if "+" in item["id"] and MOSAIC_KEY not in item["properties"]:
                    item["properties"][MOSAIC_KEY] = item["id"].split("+")
                items[record["sensor"]].setdefault(item["id"], item)
        reason = record["reason"]
        rows.append(ManifestRow(
            **{k: record[k] for k in ("site_id", "region", "split", "col", "row", "footprint_m", "sensor", "status",
                                      "reason", "collection", "item_id", "datetime", "n_candidates")},
            reason_code=_old_reason_code(reason), reason_sensor=reason.split(":", 1)[0] if reason else "",
            **{k: _float(record[k]) for k in ("eo_cloud_cover", "cloud_fraction", "nodata_fraction",
                                                "invalid_fraction")},
            assets=tuple(record["assets"]),
            fallbacks=tuple(Fallback(**{k: f[k] for k in ("item_id", "datetime", "cloud_fraction", "nodata_fraction",
                                                           "invalid_fraction")}) for f in fallbacks)))
    crs = frame.crs.to_string()
    return write_manifest(rows, {s: list(v.values()) for s, v in items.items()}, out, crs, provenance,
                          sites_per_row_group)


def _float(value: Any) -> float | None:
    import math

    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _old_reason_code(reason: str) -> str:
    """The code of a layout-1 reason sentence (the only place a reason is read back from text:
    the old layout had nothing else)."""
    if not reason:
        return ""
    for code, words in (("no_item", "no item covers"), ("no_full_cover", "no single item covers"),
                        ("too_invalid", "cloudy or without data")):
        if words in reason:
            return code
    raise DataError(f"a layout-1 manifest reason this version does not know: {reason!r}")
