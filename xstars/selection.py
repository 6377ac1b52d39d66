"""Selection: a scene per site and sensor from the site's candidates, and the counts of what
was kept and dropped (each search shard's choice for its sites, :func:`xstars.catalog.select_shard`).

:func:`select_site` is the rule, one site at a time, in the order it is applied: the anchor
sensor's clearest scene first, then for every other sensor the scene closest in date among the
equally clear ones; a site lacking a scene for any sensor is dropped with a :class:`DropReason`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xstars import items as stac_items
from xstars.manifest import (
    ROW_SCHEMA,
    Candidate,
    DropReason,
    Fallback,
    Manifest,
    ManifestRow,
    row_from_record,
)
from xstars.sensors import Sensor, sensors_of
from xstars.sites import Site


@dataclass(frozen=True)
class Choosing:
    """What the selection asks of a sensor, asked once per run rather than once per site."""

    name: str
    is_image: bool
    max_invalid_fraction: float  # Sensor.invalid_limit: what Sensor.eligible lets through
    assets: tuple[str, ...]

    @classmethod
    def of(cls, sensors: Mapping[str, Sensor], cat: Mapping[str, Any]) -> list[Choosing]:
        limit = float(cat["max_invalid_fraction"])
        return [cls(name, s.is_image, s.invalid_limit(limit), tuple(s.assets())) for name, s in sensors.items()]


def select(config: Mapping[str, Any], sites: Sequence[Site], candidates: Iterable[Candidate]) -> list[ManifestRow]:
    """The manifest rows of ``sites`` from their candidates, site by site (:func:`select_site`)."""
    by_site: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_site[candidate.site_id].append(candidate)
    choosing = Choosing.of(sensors_of(config), config["catalog"])
    return [row for site in sorted(sites, key=lambda s: s.site_id)
            for row in select_site(site, by_site[site.site_id], choosing, config["catalog"])]


def select_site(site: Site, candidates: Sequence[Candidate], sensors: Sequence[Choosing],
                cat: Mapping[str, Any]) -> list[ManifestRow]:
    """Choose a scene per sensor for one site: its manifest rows, in sensor order.

    Ranking: candidates over ``catalog.max_invalid_fraction`` are out. The anchor sensor's best
    scene is the one with the least cloud/no-data over the footprint. For every other sensor,
    footprint fractions within the same ``cloud_fraction_step`` count as equally clear and the
    scene closest in date to the anchor's wins. Labels: the item covering the footprint, most
    recent first. Ties go to the smallest item id, so the choice never depends on order.
    A site lacking a scene for any sensor is dropped, with the reason on every row of it.
    """
    step = float(cat["cloud_fraction_step"])
    by_sensor: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_sensor[candidate.sensor].append(candidate)
    unique = {s.name: _unique(by_sensor[s.name]) for s in sensors}
    anchor = cat["anchor_sensor"]
    chosen: dict[str, list[Candidate]] = {}
    reason: DropReason | None = None
    anchor_time = None
    for sensor in sorted(sensors, key=lambda s: s.name != anchor):  # the anchor first
        name = sensor.name
        rows = unique[name]
        eligible = [r for r in rows if r.invalid_fraction <= sensor.max_invalid_fraction]
        if not eligible:
            reason = reason or _no_candidate_reason(sensor, rows, cat)
            chosen[name] = []
            continue
        if name == anchor:
            ranked = sorted(eligible, key=lambda r: (r.rank_last, r.invalid_fraction, r.datetime, r.item_id))
            anchor_time = stac_items.parse_time(ranked[0].datetime)
        elif not sensor.is_image:  # labels: the most recent map
            ranked = sorted(eligible, key=lambda r: (-stac_items.parse_time(r.datetime).timestamp(), r.item_id))
        else:
            ranked = sorted(eligible, key=lambda r: (
                r.rank_last,
                math.floor(r.invalid_fraction / step + 1e-9),
                abs((stac_items.parse_time(r.datetime) - anchor_time).total_seconds()) if anchor_time else 0,
                r.invalid_fraction, r.item_id))
        chosen[name] = ranked[: 1 + int(cat["fallbacks"])]
    out = []
    for sensor in sensors:
        picks = chosen.get(sensor.name, [])
        best = picks[0] if picks else None
        out.append(ManifestRow(
            site_id=site.site_id, region=site.region, split=site.split, col=site.col, row=site.row,
            footprint_m=site.footprint_m, sensor=sensor.name, status="dropped" if reason else "ok",
            reason=reason.text if reason else "", reason_code=reason.code if reason else "",
            reason_sensor=reason.sensor if reason else "",
            collection=best.collection if best else "", item_id=best.item_id if best else "",
            datetime=best.datetime if best else "", eo_cloud_cover=best.eo_cloud_cover if best else None,
            cloud_fraction=best.cloud_fraction if best else None,
            nodata_fraction=best.nodata_fraction if best else None,
            invalid_fraction=best.invalid_fraction if best else None,
            assets=sensor.assets,
            fallbacks=tuple(Fallback(r.item_id, r.datetime, r.cloud_fraction, r.nodata_fraction, r.invalid_fraction)
                            for r in picks[1:]),
            n_candidates=len(unique[sensor.name])))
    return out


def _unique(rows: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per item (an item met in two windows or shards counts once: the first
    window by name), in no particular order: every ranking ends on the item id."""
    seen: dict[str, Candidate] = {}
    for row in rows:
        kept = seen.get(row.item_id)
        if kept is None or row.window < kept.window:
            seen[row.item_id] = row
    return list(seen.values())


def _no_candidate_reason(sensor: Choosing, rows: Sequence[Candidate], cat: Mapping[str, Any]) -> DropReason:
    return _drop_reason(sensor, len(rows), min((r.invalid_fraction for r in rows), default=math.nan), cat)


def _drop_reason(sensor: Choosing, n_unique: int, best_invalid: float, cat: Mapping[str, Any]) -> DropReason:
    """Why a sensor has no eligible scene, from its count of candidates and the best of them."""
    if not n_unique:
        return DropReason(sensor.name, "no_item", f"{sensor.name}: no item covers the footprint in the searched windows")
    if not sensor.is_image:
        return DropReason(sensor.name, "no_full_cover",
                          f"{sensor.name}: no single item covers the whole footprint ({n_unique} partial)")
    return DropReason(sensor.name, "too_invalid",
                      f"{sensor.name}: all {n_unique} scenes have more than {cat['max_invalid_fraction']:g} of the "
                      f"footprint cloudy or without data (best {best_invalid:.2f})")



class Summary:
    """Counts of sites kept and dropped (by :attr:`DropReason.key`), added up site by site."""

    def __init__(self) -> None:
        self.sites = 0
        self.kept_by_split = {split: 0 for split in ("train", "val", "test")}
        self.dropped: dict[str, int] = defaultdict(int)

    def add(self, rows: Sequence[ManifestRow]) -> None:
        """The rows of one site."""
        self.sites += 1
        reason = rows[0].drop_reason
        if reason is None:
            self.kept_by_split[rows[0].split] += 1
        else:
            self.dropped[reason.key] += 1

    def as_dict(self, searches: Sequence[dict] = ()) -> dict[str, Any]:
        return {"sites": self.sites, "kept": sum(self.kept_by_split.values()), "kept_by_split": self.kept_by_split,
                "dropped_by_reason": dict(sorted(self.dropped.items())),
                "items_skipped": len({entry for s in searches for entry in s.get("skipped", [])})}


def summary(rows: Iterable[ManifestRow], searches: Sequence[dict] = ()) -> dict[str, Any]:
    """Counts of sites kept and dropped by reason, and of the items found but skipped (for logs
    and the report)."""
    counts = Summary()
    by_site: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_site[row.site_id].append(row)
    for site_rows in by_site.values():
        counts.add(site_rows)
    return counts.as_dict(searches)


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """:func:`summary` of a manifest file, row group by row group (frozen mode)."""
    counts = rows_summary(manifest.tables(["site_id", "split", "reason", "reason_code", "reason_sensor"]))
    return counts.as_dict(manifest.provenance.get("searches", ()))


def rows_summary(tables: Iterable[pa.Table]) -> Summary:
    """The counts of kept and dropped sites of manifest rows in site order (whole tables of
    :data:`ROW_SCHEMA`, or a manifest's row groups): a site's rows share its status, so only
    each site's first row is looked at."""
    counts = Summary()
    previous = None
    for table in tables:
        site_ids = table.column("site_id").combine_chunks()
        if not len(site_ids):
            continue
        first = np.ones(len(site_ids), dtype=bool)
        first[1:] = pc.not_equal(site_ids.slice(1), site_ids.slice(0, len(site_ids) - 1)).to_numpy(zero_copy_only=False)
        first[0] = site_ids[0].as_py() != previous
        previous = site_ids[-1].as_py()
        heads = table.select(["split", "reason_code", "reason_sensor", "reason"]).filter(pa.array(first))
        for split, code, sensor, text in zip(*(column.to_pylist() for column in heads.columns), strict=True):
            counts.sites += 1
            if code:
                counts.dropped[DropReason(sensor, code, text).key] += 1
            else:
                counts.kept_by_split[split] += 1
    return counts


# ============================================================ the same rule, a table at once


class TableSelection:
    """:func:`select_site`'s choice for every site at once, in NumPy and Arrow: what each search
    shard runs on its candidates (:func:`xstars.catalog.select_shard`).

    Ranked in one job, the 2.3 million candidates of France took 13 of its 18 s as a Python
    object per candidate and a sort per site. Here each ranking key is a column and each
    step of the rule one stable ``np.lexsort`` (ties fall as the rule's do, on the item id); the
    picks (1 + ``catalog.fallbacks`` per site and sensor) stay Arrow columns, and the manifest's
    row groups are made from them column by column (:meth:`table_of`). :meth:`rows` gives one
    site's rows as :func:`select_site` would; the tests check that both give the same rows.

    ``table`` is a :func:`xstars.manifest.candidates_table` (it is not kept); ``sites`` the sites
    of the manifest, sorted by id (candidates of other sites are ignored, as the rule ignores
    candidates of sensors it is not asked about)."""

    def __init__(self, table: pa.Table, sites: Sequence[Site], sensors: Sequence[Choosing],
                 cat: Mapping[str, Any]) -> None:
        self.sites = list(sites)
        self.sensors = list(sensors)
        self.cat = cat
        names = [s.name for s in self.sensors]
        n_sensors, n_sites = len(names), len(self.sites)
        n_groups = n_sites * n_sensors  # group g: site g // n_sensors, sensor g % n_sensors
        anchor = names.index(cat["anchor_sensor"]) if cat["anchor_sensor"] in names else -1
        #: The order the rule looks at sensors in (the anchor first): the first lacking a scene says why.
        self.order = sorted(range(n_sensors), key=lambda i: i != anchor)

        self._index = index_of = {site.site_id: i for i, site in enumerate(self.sites)}
        codes, values = _codes(table.column("site_id"))
        site = np.array([index_of.get(v, -1) for v in values], dtype=np.int64)[codes]
        codes, values = _codes(table.column("sensor"))
        sensor = np.array([names.index(v) if v in names else -1 for v in values], dtype=np.int64)[codes]
        group = np.where((site >= 0) & (sensor >= 0), site * n_sensors + sensor, -1)
        del site, sensor
        item_rank = _ranks(table.column("item_id"))
        window_rank = _ranks(table.column("window"))

        # One candidate per site, sensor and item: the first window by name (then the first row).
        rows = np.flatnonzero(group >= 0)
        rows = rows[np.lexsort((window_rank[rows], item_rank[rows], group[rows]))]
        del window_rank
        first = np.ones(rows.size, dtype=bool)
        first[1:] = (group[rows][1:] != group[rows][:-1]) | (item_rank[rows][1:] != item_rank[rows][:-1])
        unique = rows[first]
        del rows, first
        invalid = table.column("invalid_fraction").to_numpy().astype(np.float64)
        self.n_unique = np.bincount(group[unique], minlength=n_groups)
        self.best_invalid = np.full(n_groups, np.nan)
        if unique.size:
            starts = np.flatnonzero(np.r_[True, group[unique][1:] != group[unique][:-1]])
            self.best_invalid[group[unique][starts]] = np.minimum.reduceat(invalid[unique], starts)
        limit = np.array([s.max_invalid_fraction for s in self.sensors] or [0.0], dtype=np.float64)
        eligible = unique[invalid[unique] <= limit[group[unique] % max(n_sensors, 1)]]
        del unique
        self.n_eligible = np.bincount(group[eligible], minlength=n_groups)

        # From here on, the eligible candidates only.
        e_group, e_item, e_invalid = group[eligible], item_rank[eligible], invalid[eligible]
        del group, item_rank, invalid
        e_sensor, e_site = e_group % max(n_sensors, 1), e_group // max(n_sensors, 1)
        codes, values = _codes(table.column("datetime"))
        e_time_rank = _string_rank(values)[codes[eligible]]
        e_time_us = np.array([(stac_items.parse_time(t) - _EPOCH) // timedelta(microseconds=1) for t in values],
                             dtype=np.int64)[codes[eligible]]
        del codes
        e_last = table.column("rank_last").to_numpy()[eligible].astype(np.int8)

        # The anchor's clearest scene per site: its date is what the other sensors are ranked by.
        anchor_us = np.zeros(n_sites, dtype=np.int64)
        has_anchor = np.zeros(n_sites, dtype=bool)
        on = np.flatnonzero(e_sensor == anchor)
        if on.size:
            on = on[np.lexsort((e_item[on], e_time_rank[on], e_invalid[on], e_last[on], e_site[on]))]
            best = on[np.r_[True, e_site[on][1:] != e_site[on][:-1]]]
            anchor_us[e_site[best]] = e_time_us[best]
            has_anchor[e_site[best]] = True

        # Each sensor's ranking as five keys, whose meaning depends on its role.
        role = np.where(e_sensor == anchor, 0, np.where(np.array([s.is_image for s in self.sensors] or [True])[e_sensor],
                                                        2, 1))  # 0: the anchor, 1: labels, 2: another image
        step = float(cat["cloud_fraction_step"])
        from_anchor = np.where(has_anchor[e_site], np.abs(e_time_us - anchor_us[e_site]), 0)
        keys = [  # most significant first
            np.where(role == 1, 0, e_last),
            np.select([role == 0, role == 1], [e_invalid, -e_time_us.astype(np.float64)], np.floor(e_invalid / step + 1e-9)),
            np.select([role == 0, role == 1], [e_time_rank, e_item], from_anchor),
            np.select([role == 0, role == 1], [e_item.astype(np.float64), 0.0], e_invalid),
            np.where(role == 2, e_item, 0),
        ]
        del role, from_anchor, e_time_rank, e_time_us, e_last, e_invalid, e_item, e_site, e_sensor
        order = np.lexsort((*reversed(keys), e_group))
        del keys
        ranked, ranked_group = eligible[order], e_group[order]
        start = np.flatnonzero(np.r_[True, ranked_group[1:] != ranked_group[:-1]]) if ranked.size else ranked
        position = np.arange(ranked.size) - np.repeat(start, np.diff(np.r_[start, ranked.size]))
        keep = position <= int(cat["fallbacks"])
        # The picks of group g are self._picks rows pick_start[g]:pick_start[g + 1], best first.
        self.pick_start = np.searchsorted(ranked_group[keep], np.arange(n_groups + 1))
        columns = table.select(list(_PICK_COLUMNS)).take(ranked[keep])
        self._picks = pa.table({name: (column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column)
                                for name, column in zip(columns.column_names, columns.columns, strict=True)})

        # Why each site is dropped, if it is: the first sensor (anchor first) without an eligible scene.
        lacking = (self.n_eligible.reshape(n_sites, n_sensors) == 0)[:, self.order]
        self.reasons: list[DropReason | None] = [None] * n_sites
        for i in np.flatnonzero(lacking.any(axis=1)):
            k = self.order[int(np.argmax(lacking[i]))]
            g = i * n_sensors + k
            self.reasons[i] = _drop_reason(self.sensors[k], int(self.n_unique[g]), float(self.best_invalid[g]), cat)

    def summary(self) -> Summary:
        """The counts of kept and dropped sites."""
        counts = Summary()
        for site, reason in zip(self.sites, self.reasons, strict=True):
            counts.sites += 1
            if reason is None:
                counts.kept_by_split[site.split] += 1
            else:
                counts.dropped[reason.key] += 1
        return counts

    def table_of(self, start: int, stop: int) -> pa.Table:
        """The manifest rows of ``sites[start:stop]`` (every sensor of each), as Arrow columns in
        :data:`xstars.manifest.ROW_SCHEMA`."""
        n_sensors = len(self.sensors)
        sites, reasons = self.sites[start:stop], self.reasons[start:stop]
        bounds = self.pick_start[start * n_sensors: stop * n_sensors + 1]
        counts = np.diff(bounds)
        best = pa.array(np.where(counts > 0, bounds[:-1], 0), mask=counts == 0)
        picks = self._picks
        # Every pick after the first of its group is a fallback, in rank order.
        span = np.arange(bounds[0], bounds[-1])
        fallback = span[~np.isin(span, bounds[:-1][counts > 0])]
        offsets = np.r_[0, np.cumsum(np.maximum(counts - 1, 0))].astype(np.int32)

        def repeat(values: list) -> list:
            return [v for v in values for _ in range(n_sensors)]

        def best_of(name: str, fill: str | None = None) -> pa.Array:
            column = picks.column(name).take(best)
            return column.fill_null(fill) if fill is not None else column

        columns = {
            "site_id": repeat([s.site_id for s in sites]), "region": repeat([s.region for s in sites]),
            "split": repeat([s.split for s in sites]), "col": repeat([s.col for s in sites]),
            "row": repeat([s.row for s in sites]), "footprint_m": repeat([float(s.footprint_m) for s in sites]),
            "sensor": [s.name for s in self.sensors] * len(sites),
            "status": repeat(["dropped" if r else "ok" for r in reasons]),
            "reason": repeat([r.text if r else "" for r in reasons]),
            "reason_code": repeat([r.code if r else "" for r in reasons]),
            "reason_sensor": repeat([r.sensor if r else "" for r in reasons]),
            "collection": best_of("collection", ""), "item_id": best_of("item_id", ""),
            "datetime": best_of("datetime", ""), "eo_cloud_cover": best_of("eo_cloud_cover"),
            "cloud_fraction": best_of("cloud_fraction"), "nodata_fraction": best_of("nodata_fraction"),
            "invalid_fraction": best_of("invalid_fraction"),
            "assets": [list(s.assets) for s in self.sensors] * len(sites),
            "fallbacks": pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(
                [picks.column(name).take(fallback).combine_chunks() for name in _FALLBACK_FIELDS],
                names=list(_FALLBACK_FIELDS))),
            "n_candidates": self.n_unique[start * n_sensors: stop * n_sensors],
        }
        return pa.table(columns, schema=ROW_SCHEMA)

    def rows(self, site: Site) -> list[ManifestRow]:
        """One site's rows, as :func:`select_site` gives them (for tests and small readers)."""
        i = self._index[site.site_id]
        return [row_from_record(record) for record in self.table_of(i, i + 1).to_pylist()]


_PICK_COLUMNS = ("collection", "item_id", "datetime", "eo_cloud_cover", "cloud_fraction", "nodata_fraction",
                 "invalid_fraction")
_FALLBACK_FIELDS = ("item_id", "datetime", "cloud_fraction", "nodata_fraction", "invalid_fraction")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A string column as integer codes and the strings they stand for."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(array.type):
        array = pc.dictionary_encode(array)
    return array.indices.to_numpy(zero_copy_only=False).astype(np.int64), array.dictionary.to_pylist()


def _ranks(column: pa.ChunkedArray) -> np.ndarray:
    """Each row's rank of its string among the column's strings, in sorted order."""
    codes, values = _codes(column)
    return _string_rank(values)[codes]


def _string_rank(values: Sequence[str]) -> np.ndarray:
    """Each string's rank in sorted order (Python's comparison of str)."""
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(np.array(values, dtype=object), kind="stable")] = np.arange(len(values))
    return ranks
