"""Sites over France: inside the boundary, never overlapping, deterministic, spatially split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import shapely
from shapely.geometry import box

from xstars.config import load_config
from xstars.errors import ConfigError
from xstars.sites import (
    assign_blocks,
    france_boundary,
    guard_cells,
    read_sites,
    sample_sites,
    write_sites,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"


def real(**sites) -> dict:
    return load_config(CONFIG, {"sites": sites} if sites else None)


def test_real_sites_are_inside_france_disjoint_and_on_the_grid() -> None:
    config = real(uniform_count=200)
    sites = sample_sites(config)
    assert len(sites) == 12 * 80 + 200
    boundary = france_boundary("EPSG:2154")
    footprints = [box(*s.bounds) for s in sites]
    assert all(boundary.contains(f) for f in footprints)
    assert len({(s.col, s.row) for s in sites}) == len(sites)  # grid cells: disjoint by construction
    union = shapely.union_all(footprints)
    assert union.area == pytest.approx(len(sites) * 2240.0**2)  # ...and truly not overlapping
    assert all(s.bounds[0] % 2240 == 0 and s.bounds[1] % 2240 == 0 for s in sites)
    assert Counter(s.region for s in sites)["france"] == 200


def test_sites_are_deterministic_and_stable_when_sites_are_added() -> None:
    first = sample_sites(real())
    assert sample_sites(real()) == first
    # Uniform sites and another seed: the city sites of a given seed do not move.
    with_uniform = sample_sites(real(uniform_count=100))
    assert {s.site_id for s in first} <= {s.site_id for s in with_uniform}
    other_seed = sample_sites(load_config(CONFIG, {"seed": 43}))
    assert {s.site_id for s in other_seed} != {s.site_id for s in first}


def test_split_is_spatial_with_a_guard_band() -> None:
    sites = sample_sites(real(uniform_count=300))
    by_cell = {(s.col, s.row): s.split for s in sites}
    counts = Counter(by_cell.values())
    # Fractions of blocks are 0.1/0.1; drawing per split keeps the site fractions close.
    assert 0.06 < counts["test"] / len(sites) < 0.14
    assert 0.06 < counts["val"] / len(sites) < 0.14
    # No val/test site touches a site of another split (8-neighbourhood).
    for (col, row), split in by_cell.items():
        if split == "train":
            continue
        for dc in (-1, 0, 1):
            for dr in (-1, 0, 1):
                other = by_cell.get((col + dc, row + dr))
                assert other in (None, split), ((col, row), split, other)
    # Whole blocks: all sites of one block share its split.
    blocks: dict[tuple[int, int], set[str]] = {}
    for s in sites:
        key = (int((s.col + 0.5) * 2240 // 11200), int((s.row + 0.5) * 2240 // 11200))
        blocks.setdefault(key, set()).add(s.split)
    assert all(len(splits) == 1 for splits in blocks.values())


def test_guard_and_block_assignment_units() -> None:
    assert guard_cells({(0, 0): "train", (1, 1): "test", (5, 5): "val"}, {(0, 0): "train", (1, 1): "test"}.get) == {
        (1, 1)
    }
    split = assign_blocks([(i, j) for i in range(40) for j in range(40)], 0.1, 0.2, seed=1)
    counts = Counter(split.values())
    assert 0.07 < counts["val"] / 1600 < 0.13 and 0.16 < counts["test"] / 1600 < 0.24
    assert assign_blocks([(3, 4)], 0.1, 0.2, seed=1)[(3, 4)] == split[(3, 4)]  # position only


def test_city_split_sends_whole_cities() -> None:
    demo = load_config(CONFIG, {"world": "demo"})
    sites = sample_sites(demo)
    assert {(s.region, s.split) for s in sites} == {("toulouse", "train"), ("etercy", "train"), ("lyon", "val"),
                                                     ("bordeaux", "test")}
    assert Counter(s.region for s in sites) == {"toulouse": 12, "etercy": 12, "lyon": 12, "bordeaux": 12}


def test_sites_table_roundtrip(tmp_path: Path) -> None:
    import geopandas as gpd

    config = load_config(CONFIG, {"world": "demo"})
    sites = sample_sites(config)
    path = write_sites(sites, tmp_path / "sites.parquet", "EPSG:2154")
    assert read_sites(path) == sites
    frame = gpd.read_parquet(path)
    assert frame.crs.to_epsg() == 2154
    assert (frame.geometry.area == 480.0**2).all()


def test_a_city_outside_france_is_refused_naming_it() -> None:
    barcelona = {"name": "barcelona", "lon": 2.1734, "lat": 41.3851}
    with pytest.raises(ConfigError, match=r"sites\.cities\[1\]: 'barcelona' lies outside the mainland France"):
        sample_sites(real(cities=["lyon", barcelona]))
    # A custom city inside France is fine.
    annecy = {"name": "annecy", "lon": 6.1294, "lat": 45.8992}
    sites = sample_sites(real(cities=[annecy], sites_per_city=20))
    assert {s.region for s in sites} == {"annecy"} and len(sites) == 20


def test_too_many_sites_for_the_radius_names_the_keys() -> None:
    with pytest.raises(ConfigError, match=r"sites\.sites_per_city: only \d+ footprints .* sites.city_radius_m=3000 of .lyon."):
        sample_sites(real(cities=["lyon"], city_radius_m=3000))
