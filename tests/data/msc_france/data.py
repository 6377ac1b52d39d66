#!/usr/bin/env python3
"""Write a small fake copy of MSC-France in the layout its authors released (for the tests).

    <root>/<Sensor>/<City>/<tile>.png     SPOT, Sentinel, Landsat; Bordeaux, Lyon, Toulouse

8-bit RGB PNGs; the tiles of one place share their file name across the sensor folders, as the
released loader expects (it swaps the sensor folder in the path). Each place is one smooth
random ground field (tests/synthetic_store.ground_field) seen at each sensor's resolution, so
the sensors agree on the ground. One Landsat tile is missing, as a partial download would leave
it. Deterministic: the same files every time.

    python tests/data/msc_france/data.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

#: Sensor folder -> pixels per side of its tiles (a 480 m footprint at 5, 15 and 30 m).
SENSORS = {"SPOT": 96, "Sentinel": 32, "Landsat": 16}
CITIES = ("Bordeaux", "Lyon", "Toulouse")
TILES_PER_CITY = 4
FOOTPRINT_M = 480.0
#: Left out on purpose: the place is then stored as dropped, with this file named as missing.
MISSING = ("Landsat", "Lyon", "0004")


def tile_names() -> list[str]:
    return [f"{k:04d}" for k in range(1, TILES_PER_CITY + 1)]


def write(root: Path) -> Path:
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from tests.synthetic_store import ground_field

    for c, city in enumerate(CITIES):
        for k, name in enumerate(tile_names()):
            place = c * TILES_PER_CITY + k
            x0, y0 = 500000.0 + 1000 * place, 6500000.0
            for sensor, px in SENSORS.items():
                if (sensor, city, name) == MISSING:
                    continue
                gsd = FOOTPRINT_M / px
                centres = (np.arange(px) + 0.5) * gsd
                x, y = np.meshgrid(x0 + centres, y0 - centres)
                rgb = np.stack([ground_field(x, y, place, band) for band in range(3)], axis=-1)
                path = root / sensor / city / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)).save(path)
    return root


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
