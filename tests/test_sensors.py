"""What a sensor is lives in config and in xstars/sensors.py only."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from xstars.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_sensors_names_a_sensor() -> None:
    # The configured sensor names (the demo world, which plays the services, may know its own
    # collections; "labels" is also the name of a role, which modules may test).
    names = set(load_config(REPO / "config.yaml")["sensors"]) - {"labels"}
    assert names >= {"s2", "l8", "ign", "spot"}
    found = []
    for path in sorted((REPO / "xstars").rglob("*.py")):
        if path.name == "sensors.py" or "demo" in path.relative_to(REPO / "xstars").parts:
            continue
        found += [f"{path.relative_to(REPO)}:{line}: {value!r}" for line, value in _string_constants(path)
                  if value in names]
    assert not found, "\n".join(found)


# ------------------------------------------------------------ Landsat on the recorded real items


def _landsat_items() -> dict[str, dict]:

    from tests.conftest import FIXTURES

    features = json.loads((FIXTURES / "landsat-c2-l2.items.json").read_text())["features"]
    return {f["id"]: f for f in features}


def test_landsat_mask_resolution_comes_from_the_item() -> None:
    # The Planetary Computer's Landsat assets carry no gsd nor transform of their own: the
    # qa_pixel mask is at 30 m (raster:bands spatial_resolution, the item's gsd), not the
    # stored grid's 28 m.
    from xstars import items as stac_items

    for item in _landsat_items().values():
        assert stac_items.asset_gsd_m(item, item["assets"]["qa_pixel"]) == 30.0, item["id"]
        assert stac_items.asset_gsd_m(item, item["assets"]["red"]) == 30.0


def test_landsat_tier2_ranked_last_and_values_outside_the_valid_range() -> None:
    import numpy as np

    from xstars.manifest import Candidate
    from xstars.selection import select
    from xstars.sensors import sensors_of
    from xstars.sites import Site

    config = load_config(REPO / "config.yaml")
    l8 = sensors_of(config)["l8"]
    items = _landsat_items()
    assert l8.item_rule(items["LC09_L2SR_084072_20250722_02_T2"]) == "rank_last"
    assert l8.item_rule(items["LC09_L2SR_084082_20250722_02_T1"]) is None
    excluded = sensors_of(load_config(REPO / "config.yaml", {"sensors": {"l8": {"item_rules": [
        {"property": "landsat:collection_category", "values": ["T2"], "action": "exclude"}]}}}))["l8"]
    assert excluded.item_rule(items["LC09_L2SR_084072_20250722_02_T2"]) == "exclude"
    # A clearer Tier 2 scene loses to a cloudier Tier 1 one (within max_invalid_fraction).
    site = Site("s_0_0", "test", 0, 0, 2240.0, "train")

    def candidate(sensor: str, item_id: str, invalid: float, **extra) -> Candidate:
        return Candidate(site_id=site.site_id, sensor=sensor, item_id=item_id, collection="c", window="w",
                         datetime="2023-06-01T10:00:00Z", eo_cloud_cover=1.0, cloud_fraction=invalid,
                         nodata_fraction=0.0, invalid_fraction=invalid, **extra)

    rows = [candidate("s2", "S2", 0.0), candidate("ign", "IGN", 0.0), candidate("spot", "SPOT", 0.0),
            candidate("labels", "WC", 0.0), candidate("l8", "T2-clear", 0.0, rank_last=True),
            candidate("l8", "T1-cloudier", 0.15)]
    chosen = {r.sensor: r for r in select(config, [site], rows)}
    assert chosen["l8"].item_id == "T1-cloudier"
    assert [f.item_id for f in chosen["l8"].fallbacks] == ["T2-clear"]
    # Digital numbers outside 7273-43636 (reflectance below 0 or above 1) are not usable.
    dn = np.array([0, 5000, 7273, 20000, 43636, 50000], dtype=np.uint16)
    assert l8.valid_pixels(dn).tolist() == [False, False, True, True, True, False]


def test_fill_is_not_blended_into_edge_pixels() -> None:
    """A scene edge (fill DN 0 beside valid DN 20000) resampled bilinearly onto a grid half a
    pixel off: every pixel left valid holds the valid value, none a blend with the fill."""
    import numpy as np
    from rasterio.transform import from_origin

    from xstars.acquire import render
    from xstars.remote import Grid, SourceWindow
    from xstars.sensors import sensors_of

    l8 = sensors_of(load_config(REPO / "config.yaml"))["l8"]
    dn = np.zeros((1, 20, 20), dtype=np.uint16)
    dn[:, :, 10:] = 20000
    qa = np.full((1, 20, 20), 21824, dtype=np.uint16)  # clear land
    qa[:, :, :10] = 1  # fill
    transform = from_origin(500000.0, 5000000.0, 30.0, 30.0)
    sources = {key: SourceWindow(dn if key != "qa_pixel" else qa, transform, "EPSG:32631") for key in l8.assets()}
    grid = Grid.from_bounds((500045.0, 4999460.0, 500555.0, 4999970.0), 30.0, "EPSG:32631")
    item = {"id": "x", "assets": {key: {"raster:bands": [{"scale": 2.75e-05, "offset": -0.2}]} for key in l8.assets()}}
    data, valid = render(l8, item, sources, grid)
    assert valid.any() and not valid.all()
    np.testing.assert_allclose(data[:, valid], 20000 * 2.75e-05 - 0.2, atol=1e-6)
