"""Staging: the build's reads planned by locality, packed into the store's shards in store order.

A shard holds consecutive samples (sites in site-id order) and one build part writes one shard.
Site ids sort by grid column, so a part's sites are a strip along a meridian and neighbouring
parts read the same source blocks again: with real Sentinel-2 COGs (1024-px blocks, 10 km at
10 m) the France build's parts of 64 sites would fetch every block about 5 times (BENCHMARKS.md,
"What the build really fetches"). With ``build.sites_per_group > 0`` the build reads in groups:

    manifest ─ locality_groups ─> group g: the sites cut along a Z-order curve of their cells
             ─ store.build_group ─> <staging>/group-<g>/<site_id>.npz   one file per site
             ─ store.build_part(staging=...) ─> the part's shard, from its sites' staged samples

A group reads its sites in Z-order in one process, so GDAL's block cache serves a block to every
neighbour that needs it; a part only packs. The store's content and order are those of the
one-step build, byte for byte (same code per site, same shard writer). A staged file is one
sample of every array of the store, uncompressed: the transient disk is about the store's raw
size again, which the workflow frees (temporary outputs) once every part is packed.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xstars.catalog import z_order
from xstars.errors import DataError

#: The file a group job writes last, beside its staged samples: the group is complete.
GROUP_RECORD = "group.json"


def n_groups(n_sites: int, sites_per_group: int) -> int:
    """Locality groups of a build of ``n_sites`` (known from the config, like the parts)."""
    return max(1, math.ceil(n_sites / sites_per_group))


def locality_groups(cells: Sequence[tuple[int, int]], sites_per_group: int) -> list[list[int]]:
    """The sample indices of each group, in the order the group reads them: every site sorted by
    the Z-order (Morton) position of its grid cell (ties by sample), cut every
    ``sites_per_group``. Neighbouring cells share source blocks and are mostly near on the curve."""
    if sites_per_group < 1:
        raise DataError(f"build.sites_per_group must be at least 1 for a locality plan, not {sites_per_group}")
    if not cells:
        return [[]]
    col0, row0 = min(c for c, _ in cells), min(r for _, r in cells)
    order = sorted(range(len(cells)), key=lambda i: (z_order(cells[i][0] - col0, cells[i][1] - row0), i))
    return [order[start:start + sites_per_group] for start in range(0, len(order), sites_per_group)]


def group_dir(staging: Path, group: int) -> Path:
    return Path(staging) / f"group-{group}"


def staged_file(staging: Path, group: int, site_id: str) -> Path:
    return group_dir(staging, group) / f"{site_id}.npz"


def write_staged(path: Path, sample: Mapping[str, Mapping[str, np.ndarray]], record: Mapping[str, Any]) -> Path:
    """One site's sample of every array (``sample[sensor][array]``, first axis of length 1) and its
    build record, written whole or not at all (a killed job leaves no half file)."""
    arrays = {f"{sensor}/{name}": (values.astype(str) if values.dtype == object else values)
              for sensor, named in sample.items() for name, values in named.items()}
    arrays["record"] = np.array(json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getbuffer())
    os.replace(tmp, path)
    return path


def read_staged(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """What :func:`write_staged` wrote: (sample by sensor and array, record); strings come back as
    object arrays, as the store's buffers hold them."""
    sample: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            record = json.loads(str(npz["record"]))
            for key in npz.files:
                if key != "record":
                    sensor, name = key.split("/", 1)
                    values = npz[key]
                    sample.setdefault(sensor, {})[name] = values.astype(object) if values.dtype.kind == "U" else values
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: not a staged sample ({err})") from None
    return sample, record


def write_group_record(staging: Path, group: int, record: Mapping[str, Any]) -> Path:
    path = group_dir(staging, group) / GROUP_RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
