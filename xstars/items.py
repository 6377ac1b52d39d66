"""Small pure functions over STAC item dicts (as the Planetary Computer and Earth Search serve them).

Every rule the pipeline applies to a STAC item lives here, once: which CRS it is in (both
``proj:epsg`` and the projection extension 2.0 ``proj:code``), which platform (``Sentinel-2A``,
``sentinel-2a``, ``SENTINEL_2A``, ``Landsat 8`` all occur), which MGRS tile (``s2:mgrs_tile`` on
the Planetary Computer, ``mgrs:*`` and ``grid:code`` on Earth Search), which processing baseline
and hence which reflectance offset, and how reprocessed duplicates of one acquisition are resolved.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
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
    """Pixel size of an asset in metres, from the asset (its ``gsd``, its ``raster:bands``
    ``spatial_resolution``, its ``proj:transform``), else from the item (its ``proj:transform``,
    its ``gsd``: the Planetary Computer's Landsat assets say nothing themselves); a transform
    counts only in a projected CRS (a geographic one is in degrees). None when nothing tells."""
    if asset.get("gsd"):
        return float(asset["gsd"])
    bands = asset.get("raster:bands") or [{}]
    if bands[0].get("spatial_resolution"):
        return float(bands[0]["spatial_resolution"])
    props = item.get("properties", {})
    for transform in (asset.get("proj:transform"), props.get("proj:transform")):
        if transform and _is_projected(item_epsg(item)):
            return abs(float(transform[0]))
    return float(props["gsd"]) if props.get("gsd") else None


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


def iso_time(moment: datetime) -> str:
    """An aware datetime as the RFC 3339 UTC text the catalogues and the manifest use."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=1 << 16)
def parse_time(text: str) -> datetime:
    """RFC 3339 timestamp -> aware UTC datetime (``Z`` and fractional seconds accepted).

    Cached: the selection ranks millions of candidates at France size, and they share the
    dates of a few thousand scenes."""
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def normalise_platform(name: str) -> str:
    """One spelling per platform: ``Sentinel-2A``, ``SENTINEL_2A`` -> ``sentinel-2a``;
    ``LANDSAT_8``, ``Landsat 8`` -> ``landsat-8``."""
    return "-".join(part for part in re.split(r"[-_\s]+", str(name).strip().lower()) if part)


def platform_spellings(name: str) -> list[str]:
    """The spellings a catalogue may use for a platform (for a server-side ``in`` filter, which
    compares exactly): each of ``-``, ``_`` and a space between the parts, in lower, upper and
    title case (``sentinel-2a``, ``SENTINEL_2A``, ``Sentinel-2A``, ``Landsat 8``...)."""
    parts = normalise_platform(name).split("-")
    cases = (str.lower, str.upper, lambda part: part[:1].upper() + part[1:].upper() if part[:1].isdigit()
             else part.capitalize())
    spellings = {sep.join(case(part) for part in parts) for sep, case in itertools.product(("-", "_", " "), cases)}
    return sorted(spellings)


def platform_matches(item: Mapping[str, Any], platforms: Sequence[str] | None) -> bool:
    """Whether the item's ``platform`` is one of ``platforms`` in any spelling (None: all)."""
    if not platforms:
        return True
    return normalise_platform(item["properties"].get("platform", "")) in {normalise_platform(p) for p in platforms}


def mgrs_tile(item: Mapping[str, Any]) -> str | None:
    """The item's MGRS tile (``31TCJ``): ``s2:mgrs_tile`` (Planetary Computer), ``mgrs:utm_zone``
    + ``mgrs:latitude_band`` + ``mgrs:grid_square`` or ``grid:code`` ``MGRS-31TCJ`` (Earth
    Search); None when the item names none."""
    props = item["properties"]
    if props.get("s2:mgrs_tile"):
        return str(props["s2:mgrs_tile"]).upper()
    parts = [props.get(f"mgrs:{key}") for key in ("utm_zone", "latitude_band", "grid_square")]
    if all(part not in (None, "") for part in parts):
        return f"{int(parts[0]):02d}{parts[1]}{parts[2]}".upper()
    code = str(props.get("grid:code", ""))
    if code.upper().startswith("MGRS-"):
        return code[5:].upper()
    return None


def cloud_cover(item: Mapping[str, Any]) -> float | None:
    """Scene-level ``eo:cloud_cover`` in percent, None when absent."""
    value = item["properties"].get("eo:cloud_cover")
    return None if value is None else float(value)


def processing_baseline(item: Mapping[str, Any]) -> str:
    """``s2:processing_baseline`` ("02.12", "05.09"), else the ``_Nxxyy_`` of ``s2:product_uri``;
    raises DataError naming the item if neither says."""
    props = item["properties"]
    baseline = props.get("s2:processing_baseline")
    if baseline:
        return str(baseline)
    found = re.search(r"_N(\d{2})(\d{2})_", str(props.get("s2:product_uri", "")))
    if found and found.group(1) != "99":  # N9999: not a real baseline
        return f"{found.group(1)}.{found.group(2)}"
    raise DataError(f"item {item.get('id')!r}: no s2:processing_baseline (nor one in s2:product_uri)")


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


#: Reprocessed copies of one acquisition carry the same sensing time, give or take rounding.
SAME_ACQUISITION_S = 1.0


def dedupe_s2_reprocessed(items: Iterable[Item], tolerance_s: float = SAME_ACQUISITION_S) -> list[Item]:
    """One item per Sentinel-2 acquisition: of the items on one MGRS tile (:func:`mgrs_tile`)
    whose datetimes are within ``tolerance_s`` of each other, the highest baseline.

    Items that name no tile are kept as they are. Ties on the baseline go to the latest
    ``s2:generation_time``, then the largest id, so the choice does not depend on the order the
    server returned them in.
    """
    by_tile: dict[str, list[Item]] = {}
    others: list[Item] = []
    for item in items:
        tile = mgrs_tile(item)
        (by_tile.setdefault(tile, []) if tile else others).append(item)
    kept: list[Item] = []
    for tile_items in by_tile.values():
        tile_items.sort(key=lambda i: (item_datetime(i), i["id"]))
        acquisition: list[Item] = []
        for item in tile_items:
            if acquisition and (item_datetime(item) - item_datetime(acquisition[0])).total_seconds() > tolerance_s:
                kept.append(max(acquisition, key=_s2_rank))
                acquisition = []
            acquisition.append(item)
        kept.append(max(acquisition, key=_s2_rank))
    return sorted([*kept, *others], key=lambda i: i["id"])


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
        if "?" in href and looks_signed(href):
            asset["href"] = href.split("?", 1)[0]
    clean.pop("links", None)  # server-specific (self/root/parent), not provenance
    return clean


def looks_signed(href: str) -> bool:
    query = href.split("?", 1)[1]
    return any(key in query for key in ("sig=", "se=", "sv=", "token=", "X-Amz-Signature="))
