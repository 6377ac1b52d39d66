"""Where each part of a generated demo world lives on disk (one place, read by generator and servers).

```
<root>/world.json                       metadata: seed, version, cities, sensors, dates
<root>/truth/<city>/landcover.tif       ground truth, Lambert-93, ESA WorldCover codes, 0.5 m
<root>/truth/shifts.json                known misregistration of every rendered scene
<root>/files/<collection>/<item_id>/<asset>.tif   COGs served over HTTP (range requests)
<root>/files/wms/<family>/<year>/<city>.tif  WMS sources (Lambert-93, uint8, the camera's bands)
<root>/stac/items.ndjson                STAC items, hrefs start with FILES_URL_PLACEHOLDER
<root>/stac/collections.json            STAC collections (list of dicts)
<root>/wms/layers.json                  WMS layers: name, title, year, bands, sources
<root>/run/                             state of the running servers (pids, ports, logs)
```
"""

from __future__ import annotations

from pathlib import Path

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
