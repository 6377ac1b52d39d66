"""Verify: a built store against its manifest, and against the checksums recorded at build time.

Checks that every site of the manifest is in the store (in sample order), kept or explained
(dropped by the catalog or at build time, with its reason), and that every shard file still has the
SHA-256 its build job recorded. Nothing is rewritten: the report lists what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xstars.layout import open_store, store_sensors
from xstars.manifest import Manifest, file_sha256
from xstars.store import _shard_file


def verify_store(path: Path | str, manifest: Manifest) -> dict[str, Any]:
    """The problems found (empty when the store is whole) and what was checked."""
    path = Path(path)
    root = open_store(path)
    meta = root.attrs["xstars"]
    sensors = list(store_sensors(root))
    problems: list[str] = []
    # The manifest's side, a row group at a time: the site ids and the catalog's drops.
    expected: list[str] = []
    dropped: dict[str, str] = {}
    for table in manifest.tables(["site_id", "status", "reason"]):
        for site, state, reason in zip(*(table.column(c).to_pylist() for c in ("site_id", "status", "reason")),
                                       strict=True):
            if not expected or expected[-1] != site:
                expected.append(site)
            if state != "ok":
                dropped[site] = reason
    stored = [str(s) for s in root[sensors[0]]["site_id"][:]]
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        problems.append(f"site ids differ from the manifest's sites: missing {missing[:10]}, unexpected {extra[:10]}")
    status = dict(zip(stored, root[sensors[0]]["status"][:], strict=True))
    for site, state in status.items():
        if state != "ok" and not (str(state).startswith("dropped: ") and len(str(state)) > len("dropped: ")):
            problems.append(f"{site}: status {state!r} gives no reason")
    for site, reason in dropped.items():
        if not reason:
            problems.append(f"{site}: dropped by the catalog without a reason")
        elif status.get(site, "ok") == "ok" and site in status:
            problems.append(f"{site}: dropped by the catalog ({reason}) but stored as ok")
    recorded = meta.get("shard_sha256")
    checked = 0
    if not recorded:
        problems.append("no shard checksums recorded (built before they were, or not finalised)")
    else:
        for part in range(int(meta["parts"])):
            sums = recorded.get(str(part))
            if not sums:
                problems.append(f"part {part}: no checksums recorded")
                continue
            for key, digest in sums.items():
                sensor, name = key.split("/")
                ndim = root[sensor][name].ndim
                shard = _shard_file(path, sensor, name, part, ndim)
                if digest is None:  # all fill value at build time: no file then, none now
                    if shard.exists():
                        problems.append(f"{shard.relative_to(path)}: present, was empty (all fill value) at build time")
                elif not shard.exists():
                    problems.append(f"{shard.relative_to(path)}: missing")
                elif file_sha256(shard) != digest:
                    problems.append(f"{shard.relative_to(path)}: checksum differs from the one recorded at build time")
                checked += 1
    return {"store": str(path), "ok": not problems, "problems": problems, "sites": len(expected),
            "sensors": sensors, "shards_checked": checked}
