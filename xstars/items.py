"""Small pure functions over STAC item dicts (as the Planetary Computer serves them).

Every rule the pipeline applies to a STAC item lives here, once: which CRS it is in (both
``proj:epsg`` and the projection extension 2.0 ``proj:code``), which platform (``Sentinel-2A``
and ``sentinel-2a`` both occur), which processing baseline and hence which reflectance offset,
and how reprocessed duplicates of one acquisition are resolved.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from xstars.errors import DataError

Item = dict[str, Any]


def item_epsg(item: Mapping[str, Any]) -> int:
    """EPSG code of the item's grid from ``proj:code`` ("EPSG:32631") or ``proj:epsg`` (32631).

    Asset-level values win over item-level ones only when the item has none (PC puts them on
    the item). Raises DataError naming the item when neither is present.
    """
    props = item.get("properties", {})
    code = props.get("proj:code")
    if code is None:
        epsg = props.get("proj:epsg")
        if epsg is not None:
            return int(epsg)
        for asset in item.get("assets", {}).values():
            code = asset.get("proj:code") or (asset.get("proj:epsg") and f"EPSG:{asset['proj:epsg']}")
            if code:
                break
    if isinstance(code, str) and code.upper().startswith("EPSG:"):
        return int(code.split(":", 1)[1])
    raise DataError(f"item {item.get('id')!r}: no proj:code or proj:epsg to tell its CRS")


def item_crs(item: Mapping[str, Any]) -> str:
    """The item's CRS as ``"EPSG:<code>"``."""
    return f"EPSG:{item_epsg(item)}"


def asset_gsd_m(item: Mapping[str, Any], asset: Mapping[str, Any]) -> float | None:
    """Pixel size of an asset in metres: its ``gsd``, else its ``proj:transform`` when the item's
    CRS is projected (a geographic transform is in degrees); None when neither tells."""
    if asset.get("gsd"):
        return float(asset["gsd"])
    transform = asset.get("proj:transform")
    if transform and _is_projected(item_epsg(item)):
        return abs(float(transform[0]))
    return None


@functools.cache
def _is_projected(epsg: int) -> bool:
    from pyproj import CRS

    return CRS.from_epsg(epsg).is_projected


def item_datetime(item: Mapping[str, Any]) -> datetime:
    """Acquisition time (UTC); the middle of ``start_datetime``/``end_datetime`` when null."""
    props = item["properties"]
    if props.get("datetime"):
        return parse_time(props["datetime"])
    start, end = props.get("start_datetime"), props.get("end_datetime")
    if start and end:
        t0, t1 = parse_time(start), parse_time(end)
        return t0 + (t1 - t0) / 2
    raise DataError(f"item {item.get('id')!r}: no datetime nor start/end_datetime")


def parse_time(text: str) -> datetime:
    """RFC 3339 timestamp -> aware UTC datetime (``Z`` and fractional seconds accepted)."""
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def platform_matches(item: Mapping[str, Any], platforms: Sequence[str] | None) -> bool:
    """Whether the item's ``platform`` is one of ``platforms`` (case-insensitive; None: all)."""
    if not platforms:
        return True
    platform = str(item["properties"].get("platform", "")).lower()
    return platform in {p.lower() for p in platforms}


def cloud_cover(item: Mapping[str, Any]) -> float | None:
    """Scene-level ``eo:cloud_cover`` in percent, None when absent."""
    value = item["properties"].get("eo:cloud_cover")
    return None if value is None else float(value)


def processing_baseline(item: Mapping[str, Any]) -> str:
    """``s2:processing_baseline`` ("02.12", "05.09"); raises DataError naming the item if absent."""
    baseline = item["properties"].get("s2:processing_baseline")
    if not baseline:
        raise DataError(f"item {item.get('id')!r}: no s2:processing_baseline")
    return str(baseline)


def _baseline_key(baseline: str) -> tuple[int, ...]:
    return tuple(int(part) for part in baseline.split("."))


def s2_offset_for_baseline(baseline: str) -> int:
    """DN offset of Sentinel-2 L2A reflectance: reflectance = (DN + offset) / 10000.

    -1000 from processing baseline 04.00 on, 0 before. Decided by the baseline, never the date:
    the Planetary Computer also serves pre-2022 acquisitions reprocessed at baseline 05.xx.
    """
    return -1000 if _baseline_key(baseline) >= (4, 0) else 0


def dedupe_by_id(items: Iterable[Item]) -> list[Item]:
    """Items with duplicate ids (pages overlapping, retried searches) kept once, first wins."""
    seen: dict[str, Item] = {}
    for item in items:
        seen.setdefault(item["id"], item)
    return list(seen.values())


def dedupe_s2_reprocessed(items: Iterable[Item]) -> list[Item]:
    """One item per Sentinel-2 acquisition: on (datetime, ``s2:mgrs_tile``) the highest baseline.

    Items without ``s2:mgrs_tile`` (another provider's schema) are kept as they are. Ties on the
    baseline go to the latest ``s2:generation_time``, then the largest id, so the choice does
    not depend on the order the server returned them in.
    """
    best: dict[tuple[str, str], Item] = {}
    others: list[Item] = []
    for item in items:
        tile = item["properties"].get("s2:mgrs_tile")
        if not tile:
            others.append(item)
            continue
        key = (item_datetime(item).isoformat(), tile)
        if key not in best or _s2_rank(item) > _s2_rank(best[key]):
            best[key] = item
    return sorted([*best.values(), *others], key=lambda i: i["id"])


def _s2_rank(item: Mapping[str, Any]) -> tuple:
    props = item["properties"]
    return (_baseline_key(processing_baseline(item)), props.get("s2:generation_time") or "", item["id"])


def unsigned(item: Mapping[str, Any]) -> Item:
    """A copy of the item with every asset href stripped of its query string (SAS token).

    The manifest stores items through this, so that a signed URL can never end up in it.
    """
    clean = copy.deepcopy(dict(item))
    for asset in clean.get("assets", {}).values():
        href = asset.get("href", "")
        if "?" in href and _looks_signed(href):
            asset["href"] = href.split("?", 1)[0]
    clean.pop("links", None)  # server-specific (self/root/parent), not provenance
    return clean


def _looks_signed(href: str) -> bool:
    query = href.split("?", 1)[1]
    return any(key in query for key in ("sig=", "se=", "sv=", "token=", "X-Amz-Signature="))
