"""Selection: a scene per site and sensor from the site's candidates, and the counts of what
was kept and dropped (the catalog's manifest job, :func:`xstars.catalog.merge_manifest`).

:func:`select_site` is the rule, one site at a time, in the order it is applied: the anchor
sensor's clearest scene first, then for every other sensor the scene closest in date among the
equally clear ones; a site lacking a scene for any sensor is dropped with a :class:`DropReason`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xstars import items as stac_items
from xstars.manifest import Candidate, DropReason, Fallback, Manifest, ManifestRow
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
    if not rows:
        return DropReason(sensor.name, "no_item", f"{sensor.name}: no item covers the footprint in the searched windows")
    if not sensor.is_image:
        return DropReason(sensor.name, "no_full_cover",
                          f"{sensor.name}: no single item covers the whole footprint ({len(rows)} partial)")
    best = min(r.invalid_fraction for r in rows)
    return DropReason(sensor.name, "too_invalid",
                      f"{sensor.name}: all {len(rows)} scenes have more than {cat['max_invalid_fraction']:g} of the "
                      f"footprint cloudy or without data (best {best:.2f})")



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
    counts = Summary()
    for table in manifest.tables(["site_id", "split", "status", "reason", "reason_code", "reason_sensor"]):
        previous = None
        for record in table.to_pylist():
            if record["site_id"] != previous:
                previous = record["site_id"]
                counts.sites += 1
                if record["reason_code"]:
                    counts.dropped[DropReason(record["reason_sensor"], record["reason_code"], record["reason"]).key] += 1
                else:
                    counts.kept_by_split[record["split"]] += 1
    return counts.as_dict(manifest.provenance.get("searches", ()))
