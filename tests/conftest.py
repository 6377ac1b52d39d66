"""Shared fixtures: a small generated demo world, served by the real loopback servers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "planetary-computer"

#: A demo world small enough for tests (two cities in two UTM zones, 1.28 km each).
SMALL_DEMO = {
    "seed": 7,
    "extent_m": 1280,
    "label_gsd_m": 0.5,
    "cities": [
        {"name": "toulouse", "lon": 1.4442, "lat": 43.6047},
        {"name": "bordeaux", "lon": -0.5792, "lat": 44.8378},
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated demo world (generated once per test session)."""
    from xstars.demo.generate import generate_world

    root = tmp_path_factory.mktemp("demo_world")
    generate_world(root, SMALL_DEMO)
    return root


@pytest.fixture(scope="session")
def demo_server(demo_root: Path):
    """The demo world served on free loopback ports; stopped at the end of the session."""
    from xstars.demo import server

    info = server.start(demo_root, host="127.0.0.1", port=free_port(), backend_port=free_port())
    yield info
    server.stop(demo_root)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
