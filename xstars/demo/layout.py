"""Where each part of a generated demo world lives on disk (one place, read by generator and servers).

```
<root>/world.json                       metadata: seed, version, cities, sensors, dates
<root>/truth/<city>/landcover.tif       ground truth, Lambert-93, ESA WorldCover codes, 0.5 m
<root>/truth/shifts.json                known misregistration of every rendered scene
<root>/files/<collection>/<item_id>/<asset>.tif   COGs served over HTTP (blob storage, /files)
<root>/files/wms/<family>/<year>/<city>.tif  WMS sources (Lambert-93, uint8, the camera's bands)
<root>/stac/items.ndjson                STAC items, hrefs on blob storage (blob_href) or FILES_URL_PLACEHOLDER
<root>/stac/collections.json            STAC collections (list of dicts)
<root>/wms/layers.json                  WMS layers: name, title, year, bands, sources
<root>/run/                             state of the running servers (pids, ports, logs)
```
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

#: Item hrefs are written with this prefix and rewritten to the file server's URL when served,
#: so the same generated world can be served on any host and port.
FILES_URL_PLACEHOLDER = "{files_url}"


def world_json(root: Path) -> Path:
    return Path(root) / "world.json"


def truth_dir(root: Path) -> Path:
    return Path(root) / "truth"


def landcover_path(root: Path, city: str) -> Path:
    return truth_dir(root) / city / "landcover.tif"


def shifts_path(root: Path) -> Path:
    return truth_dir(root) / "shifts.json"


def files_dir(root: Path) -> Path:
    return Path(root) / "files"


def items_path(root: Path) -> Path:
    return Path(root) / "stac" / "items.ndjson"


def collections_path(root: Path) -> Path:
    return Path(root) / "stac" / "collections.json"


def wms_layers_path(root: Path) -> Path:
    return Path(root) / "wms" / "layers.json"


def run_dir(root: Path) -> Path:
    return Path(root) / "run"


# ============================================================ the Planetary Computer's blob storage

#: Where the Planetary Computer keeps each of the demo's collections: (storage account, container),
#: as its real hrefs say (``https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/...``).
BLOB_CONTAINERS: dict[str, tuple[str, str]] = {
    "sentinel-2-l2a": ("sentinel2l2a01", "sentinel2-l2"),
    "landsat-c2-l2": ("landsateuwest", "landsat-c2"),
    "esa-worldcover": ("ai4edataeuwest", "esa-worldcover"),
}

BLOB_DOMAIN = ".blob.core.windows.net"


def blob_href(collection: str, relative: str) -> str:
    """The href of ``files/<collection>/<relative>`` on the collection's blob storage.

    ``http://<account>.blob.core.windows.net/<container>/<collection>/<relative>``: the host
    the Planetary Computer SDK signs (it only signs ``*.blob.core.windows.net``); plain http
    and no port, so that GDAL sends the read to the gateway as a proxy request.
    """
    account, container = BLOB_CONTAINERS[collection]
    return f"http://{account}{BLOB_DOMAIN}/{container}/{collection}/{relative}"


def blob_relative(account: str, path: str) -> str | None:
    """The file (relative to ``files/``) a blob storage path names, or None if it names none of ours.

    ``path`` is ``/<container>/<collection>/<rest>``, and ``(account, container)`` must be
    the storage of that collection (a token for one container opens no other's files).
    """
    container, _, relative = path.lstrip("/").partition("/")
    collection = relative.split("/", 1)[0]
    return relative if BLOB_CONTAINERS.get(collection) == (account, container) and "/" in relative else None


def local_path(root: Path, href: str) -> Path:
    """The file of the world an item href names (blob storage or ``{files_url}`` form)."""
    if href.startswith(FILES_URL_PLACEHOLDER + "/"):
        return files_dir(root) / href[len(FILES_URL_PLACEHOLDER) + 1:]
    parts = urlsplit(href)
    relative = blob_relative(parts.netloc.removesuffix(BLOB_DOMAIN), parts.path)
    if not parts.netloc.endswith(BLOB_DOMAIN) or relative is None:
        raise ValueError(f"{href} is not a file of the demo world")
    return files_dir(root) / relative
