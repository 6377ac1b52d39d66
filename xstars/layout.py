"""Layout: the store's contract with its readers (its version, how to open it, its sensors).

Every command and class that reads a store (pretraining, evaluation, verification, export,
:class:`xstars.torch_dataset.StoreDataset`) opens it with :func:`open_store`, so that a path
that is not a store, a ``zarr.json`` that is not JSON, or a store written in another layout
ends in one :class:`~xstars.errors.DataError` naming the path and what is wrong, instead of
a traceback from deep inside zarr (or, worse, arrays read with the wrong meaning).

The layout version is recorded in the root attributes (``xstars.layout_version``) by whatever
writes a store (``xstars build init``, ``xstars import msc-france``). Bump
:data:`LAYOUT_VERSION` whenever a reader of the previous layout would misread the new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xstars.errors import DataError

#: Version 1: one group per sensor with ``data``, ``valid``, ``band`` and the per-sample
#: ``site_id``, ``region``, ``split``, ``status``, ``date``, ``item_id``, ``transform``,
#: ``cloud_fraction``; ``spatial_ref``; root attributes ``xstars``.
LAYOUT_VERSION = 1

#: Roles a sensor plays: images to learn from, or labels (class maps) to evaluate with.
IMAGE, LABELS = "image", "labels"
ROLES = (IMAGE, LABELS)


def open_store(path: Path | str, mode: str = "r"):
    """The root group of the store at ``path``, checked to be an xstars store of this layout.

    Raises DataError naming the path (and the key or version) when it is missing, not a Zarr
    v3 store, has a ``zarr.json`` that is not JSON, is not an xstars store, or was written in
    another layout version."""
    import zarr

    root_attrs = read_root_attributes(path)
    meta = root_attrs.get("xstars")
    if not isinstance(meta, Mapping):
        raise DataError(f"{path}: not an xstars store (its root attributes have no 'xstars' entry)")
    found = meta.get("layout_version")
    if found != LAYOUT_VERSION:
        written = "no layout version (written before xstars recorded one)" if found is None else \
            f"layout version {found!r}"
        raise DataError(f"{path}: store has {written}, this xstars reads layout version {LAYOUT_VERSION}: "
                        "rebuild the store with this xstars (or read it with the xstars that wrote it)")
    try:
        return zarr.open_group(str(path), mode=mode)
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        raise DataError(f"{path}: not a readable Zarr store ({type(err).__name__}: {err})") from None


def read_root_attributes(path: Path | str) -> dict[str, Any]:
    """The root attributes of a Zarr v3 store, read from its ``zarr.json`` (nothing else opened)."""
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"{folder}: no such store (give the folder of a Zarr store, e.g. "
                        "results/dataset/dataset.zarr)")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (a Zarr store is a folder holding a zarr.json)")
    meta_path = folder / "zarr.json"
    if not meta_path.is_file():
        raise DataError(f"{folder}: no zarr.json, not a Zarr v3 store (an unfinished build? see `xstars build init`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{meta_path}: not JSON (not UTF-8 text: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise DataError(f"{meta_path}: not the metadata of a Zarr v3 group (zarr_format 3, node_type group)")
    attributes = meta.get("attributes", {})
    return attributes if isinstance(attributes, dict) else {}


def store_sensors(root) -> dict[str, dict[str, Any]]:
    """The store's sensors, each with at least its ``role`` (``image`` or ``labels``).

    From the root attribute ``xstars.sensors`` when the store records it (in its order);
    otherwise from the groups themselves, sorted by name: a group whose ``data`` declares
    ``flag_values`` (class codes) holds labels."""
    recorded = root.attrs["xstars"].get("sensors")
    if recorded:
        sensors = {name: dict(entry) for name, entry in recorded.items()}
    else:
        sensors = {}
        for name in _group_names(root):
            attrs = root[name]["data"].attrs if "data" in root[name] else {}
            sensors[name] = {"role": LABELS if "flag_values" in attrs else IMAGE}
    for name, entry in sensors.items():
        if entry.get("role") not in ROLES:
            raise DataError(f"{_where(root)}: sensor {name!r} has role {entry.get('role')!r}, not one of {ROLES}")
    return sensors


def image_sensors(root) -> list[str]:
    """The sensors whose role is ``image``, in store order."""
    return [name for name, entry in store_sensors(root).items() if entry["role"] == IMAGE]


def labels_sensor(root) -> str | None:
    """The sensor holding the label maps, or None when the store has none (e.g. an imported one)."""
    names = [name for name, entry in store_sensors(root).items() if entry["role"] == LABELS]
    if len(names) > 1:
        raise DataError(f"{_where(root)}: several label groups {names}: xstars evaluates with one")
    return names[0] if names else None


def _group_names(root) -> list[str]:
    """Group names, sorted (zarr does not keep the order groups were created in)."""
    return sorted(root.group_keys())


def _where(root) -> str:
    """The store's location, for messages."""
    return str(getattr(root.store, "root", root.store))
