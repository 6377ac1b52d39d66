"""xstars.config: the shipped config, defaults, world overlays, overrides and error messages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from xstars.config import (
    deep_merge,
    load_cities,
    load_config,
    load_schema,
    parse_override,
    read_yaml,
    resolve_config,
    retype_snakemake_overrides,
    validate,
)
from xstars.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"
LOOPBACK = re.compile(r"^http://127\.0\.0\.1:\d+/")


def test_shipped_config_validates_in_every_world() -> None:
    for world in read_yaml(CONFIG)["worlds"]:
        config = load_config(CONFIG, {"world": world})
        assert config["world"] == world
        assert "worlds" not in config


def test_real_world_is_the_top_level_of_the_file() -> None:
    raw = read_yaml(CONFIG)
    config = load_config(CONFIG)
    assert config["world"] == "real"
    for section in ("stac", "ign", "sensors", "sites", "catalog", "dates", "demo"):
        assert config[section] == raw[section], section
    assert config["stac"]["url"] == "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert config["ign"]["wms_url"] == "https://data.geopf.fr/wms-r"
    assert len(config["sites"]["cities"]) == 12


def test_defaults_fill_missing_sections_and_nested_keys() -> None:
    config = validate(
        {"stac": {"url": "http://127.0.0.1:1/stac"}, "sensors": {"ign": {"gsd_m": 0.2}}}
    )
    assert config["stac"]["url"] == "http://127.0.0.1:1/stac"
    assert config["stac"]["max_retries"] == 6
    assert config["sensors"]["ign"] == {"bands": ["R", "G", "B", "NIR"], "gsd_m": 0.2}
    assert config["sensors"]["l8"]["platforms"] == ["landsat-8"]
    assert config["sensors"]["s2"]["mask_asset"] == "SCL"
    assert config["sites"]["split"]["method"] == "blocks"
    assert config["dates"]["seasons"][0]["name"] == "spring"
    assert config["demo"]["cities"][0]["name"] == "toulouse"
    assert config["world"] == "real"
    # A default is a copy: filling one config must not change the next one.
    config["sensors"]["s2"]["bands"].append("B01")
    assert "B01" not in validate({})["sensors"]["s2"]["bands"]


def test_partial_sensor_keeps_its_own_defaults() -> None:
    l8 = {"collection": "c", "bands": ["red"], "mask_asset": "qa", "gsd_m": 28}
    config = validate({"sensors": {"l8": {**l8, "mask_invalid_bits": [3]}}})
    assert config["sensors"]["l8"]["max_scene_cloud_cover"] == 50
    # How to read the mask is not guessed from its name: one rule or the other must be given.
    with pytest.raises(ConfigError, match=r"'sensors\.l8': give exactly one of mask_invalid_classes"):
        validate({"sensors": {"l8": l8}})
    with pytest.raises(ConfigError, match=r"config key 'sensors\.l8\.mask_asset': required"):
        validate({"sensors": {"l8": {"collection": "c", "bands": ["red"], "gsd_m": 30}}})


def test_demo_world_swaps_in_loopback_endpoints_and_demo_sites() -> None:
    real = load_config(CONFIG)
    demo = load_config(CONFIG, {"world": "demo"})
    assert LOOPBACK.match(demo["stac"]["url"])
    assert LOOPBACK.match(demo["ign"]["wms_url"])
    # Same signing path as against the real API: sign_inplace leaves loopback hrefs unchanged.
    assert demo["stac"]["signing"] == "planetary_computer"
    assert demo["sites"]["cities"] == [city["name"] for city in demo["demo"]["cities"]]
    assert demo["sites"]["footprint_m"] < real["sites"]["footprint_m"]
    # What the overlay does not name is the real build's.
    assert demo["stac"]["max_retries"] == real["stac"]["max_retries"]
    assert demo["ign"]["layer_template"] == real["ign"]["layer_template"]
    for section in ("dates", "demo", "seed"):
        assert demo[section] == real[section], section
    # Only the Landsat grid differs: 480 m is 16 pixels of 30 m, 2240 m is 80 of 28 m.
    assert {**demo["sensors"], "l8": real["sensors"]["l8"]} == real["sensors"]
    # ...but the outputs of the two worlds never mix.
    assert demo["results_dir"] != real["results_dir"]


def test_demo_sites_fit_inside_the_synthetic_cities() -> None:
    demo = load_config(CONFIG, {"world": "demo"})
    reach = demo["sites"]["city_radius_m"] + demo["sites"]["footprint_m"] / 2
    assert reach <= demo["demo"]["extent_m"] / 2


def test_override_replaces_an_endpoint_and_keeps_the_rest() -> None:
    url = "http://127.0.0.1:9999/stac"
    config = load_config(CONFIG, {"stac": {"url": url}})
    assert config["stac"]["url"] == url
    assert config["stac"]["signing"] == "planetary_computer"
    assert config["stac"]["max_retries"] == 6


def test_override_wins_over_the_world_overlay() -> None:
    url = "http://127.0.0.2:9000/stac"
    config = load_config(CONFIG, {"world": "demo", "stac": {"url": url}})
    assert config["stac"]["url"] == url
    assert LOOPBACK.match(config["ign"]["wms_url"])


def test_snakemake_config_with_string_scalars_resolves_like_the_cli() -> None:
    """common.smk's path: `config` already holds the overrides, nested scalars are strings."""
    overrides = {"world": "demo", "stac": {"max_retries": "3"}, "dates": {"end": "2023-09-30"}}
    typed = retype_snakemake_overrides(overrides)
    config = resolve_config(deep_merge(read_yaml(CONFIG), typed), typed)
    assert config["stac"]["max_retries"] == 3
    assert config["dates"]["end"] == "2023-09-30"
    assert LOOPBACK.match(config["stac"]["url"])
    typed_by_hand = {"world": "demo", "stac": {"max_retries": 3}, "dates": {"end": "2023-09-30"}}
    assert config == load_config(CONFIG, typed_by_hand)


def test_retype_keeps_strings_that_are_not_scalars_of_another_type() -> None:
    retyped = retype_snakemake_overrides(
        {"a": "http://x/y", "b": "[1, 2", "c": "0.5", "d": ["true", "EPSG:2154"]}
    )
    assert retyped == {"a": "http://x/y", "b": "[1, 2", "c": 0.5, "d": [True, "EPSG:2154"]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sensors": {"s2": {"gsdm": 10}}}, r"config key 'sensors\.s2\.gsdm': unknown key"),
        ({"stac": {"urll": "http://x"}}, r"config key 'stac\.urll': unknown key \(allowed here: "),
        ({"stacc": {}}, r"config key 'stacc': unknown key"),
        (
            {"sensors": {"s2": {"gsd_m": "ten"}}},
            r"config key 'sensors\.s2\.gsd_m': 'ten' is not of",
        ),
        ({"sensors": {"s2": {"gsd_m": -1}}}, r"config key 'sensors\.s2\.gsd_m': -1 is less than"),
        ({"seed": "abc"}, r"config key 'seed': 'abc' is not of type 'integer'"),
        ({"stac": {"signing": "sas"}}, r"config key 'stac\.signing': 'sas' is not one of"),
        ({"world": "dmeo"}, r"config key 'world': 'dmeo' is not one of the worlds"),
        (
            {"sites": {"cities": ["lyon", "lyonn"]}},
            r"config key 'sites\.cities\[1\]': 'lyonn' is not",
        ),
        ({"dates": {"start": "2021-02-30"}}, r"config key 'dates\.start': '2021-02-30' is not a"),
        ({"dates": {"start": "2024-01-01"}}, r"config key 'dates': start 2024-01-01 is after end"),
        ({"sites": {"split": {"val_fraction": 0.5, "test_fraction": 0.5}}}, r"'sites\.split'"),
        ({"demo": {"stac_backend_port": 8765}}, r"config key 'demo\.stac_backend_port': must"),
        ({"ign": {"layer_template": "ORTHO"}}, r"config key 'ign\.layer_template': 'ORTHO' does"),
    ],
)
def test_invalid_values_name_the_key_path(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, overrides)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIG, {"seed": -1, "stac": {"page_limit": 5000}})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert any("'seed'" in line for line in lines)
    assert any("'stac.page_limit'" in line for line in lines)


def test_error_in_an_overlay_points_at_the_overlay() -> None:
    raw = read_yaml(CONFIG)
    raw["worlds"]["demo"]["stac"]["urll"] = "http://127.0.0.1:1/stac"
    with pytest.raises(ConfigError, match=r"config key 'worlds\.demo\.stac\.urll': unknown key"):
        resolve_config(raw, {"world": "demo"})
    raw["worlds"]["demo"]["sites"]["cities"] = ["tolouse"]
    del raw["worlds"]["demo"]["stac"]["urll"]
    with pytest.raises(ConfigError, match=r"'worlds\.demo\.sites\.cities\[0\]': 'tolouse'"):
        resolve_config(raw, {"world": "demo"})


def test_unquoted_yaml_dates_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("dates:\n  start: 2021-05-01\n  end: 2021-09-30\n")
    config = load_config(path)
    assert (config["dates"]["start"], config["dates"]["end"]) == ("2021-05-01", "2021-09-30")


def test_unreadable_config_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_parse_override() -> None:
    assert parse_override("stac.max_retries=3") == {"stac": {"max_retries": 3}}
    assert parse_override("ign.years=[2021]") == {"ign": {"years": [2021]}}
    assert parse_override("stac.url=http://h:1/x=y") == {"stac": {"url": "http://h:1/x=y"}}
    for bad in ("stac.url", "=3", "stac..url=x"):
        with pytest.raises(ConfigError, match="KEY.SUBKEY=VALUE"):
            parse_override(bad)


def test_schema_copies_are_identical() -> None:
    source = REPO / "xstars" / "schemas" / "config.schema.yaml"
    copy = REPO / "workflow" / "schemas" / "config.schema.yaml"
    assert copy.read_bytes() == source.read_bytes(), (
        "workflow/schemas/config.schema.yaml differs from its source: "
        "cp xstars/schemas/config.schema.yaml workflow/schemas/"
    )


def _object_schemas(node: Any, path: str = "#") -> list[tuple[str, dict]]:
    """Every sub-schema that declares `properties`, with a readable location."""
    found = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append((path, node))
        for key, value in node.items():
            found += _object_schemas(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _object_schemas(value, f"{path}/{i}")
    return found


def test_schema_documents_every_key_and_rejects_unknown_ones() -> None:
    for where, schema in _object_schemas(load_schema()):
        assert schema.get("additionalProperties") is False, where
        for name, prop in schema["properties"].items():
            assert prop.get("description"), f"{where}/properties/{name} has no description"


def test_schema_defaults_are_valid() -> None:
    assert validate({}) == validate(validate({}))


def test_city_table_covers_the_configured_and_demo_cities() -> None:
    cities = load_cities()
    assert sorted(load_config(CONFIG)["sites"]["cities"]) == sorted(cities)
    for lon, lat in cities.values():  # mainland France
        assert -5.5 < lon < 10 and 41 < lat < 51.5
    # The demo cities sit where the real ones are, so demo sites fall inside them.
    for city in load_config(CONFIG)["demo"]["cities"]:
        assert cities[city["name"]] == (city["lon"], city["lat"])


def test_footprint_must_be_whole_pixels_of_every_sensor() -> None:
    # 2240 m is 74.7 Landsat pixels at 30 m: the store could not hold the tile on a whole grid.
    with pytest.raises(ConfigError, match=r"'sensors\.l8\.gsd_m': sites\.footprint_m \(2240\) is 74\.667 pixels"):
        validate({"sensors": {"l8": {"collection": "c", "bands": ["red"], "mask_asset": "qa",
                                     "mask_invalid_bits": [3], "gsd_m": 30}}})
    assert load_config(CONFIG, {"world": "demo"})["sensors"]["l8"]["gsd_m"] == 30  # 480 m = 16 px
