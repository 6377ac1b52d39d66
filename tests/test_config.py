"""xstars.config: the shipped config, defaults, world overlays, overrides and error messages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from xstars.config import (
    city_name,
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
    for section in ("http", "catalogs", "sites", "catalog", "dates", "demo"):
        assert config[section] == raw[section] | ({} if section != "catalogs" else config[section]), section
    assert config["catalogs"]["planetary_computer"]["url"] == "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert config["catalogs"]["geoplateforme"]["url"] == "https://data.geopf.fr/wms-r"
    assert list(config["sensors"]) == list(raw["sensors"]) == ["s2", "l8", "ign", "spot", "labels"]
    assert len(config["sites"]["cities"]) == 12


#: A minimal stac_raster sensor (the sections that name sensors are left out of these checks).
L8 = {"kind": "stac_raster", "catalog": "pc", "collection": "c", "bands": ["red"], "mask": {"asset": "qa"},
      "units": {"rule": "raster_bands", "scale": 2.75e-5, "offset": -0.2}, "gsd_m": 28}
PC = {"pc": {"kind": "stac", "url": "http://127.0.0.1:1/stac"}}


def test_defaults_fill_missing_sections_and_nested_keys() -> None:
    config = validate({"catalogs": PC, "sensors": {"l8": {**L8, "mask": {"asset": "qa", "invalid_bits": [3]}}}},
                      sections=["catalogs", "sensors"])
    assert config["catalogs"]["pc"] == {"kind": "stac", "url": "http://127.0.0.1:1/stac", "signing": "none",
                                        "page_limit": 100, "asset_keys": {}, "token_url": None}
    assert config["http"]["max_retries"] == 6
    l8 = config["sensors"]["l8"]
    assert l8["max_scene_cloud_cover"] == 50 and l8["fill_values"] == [0] and l8["mask"]["fill_bits"] == [0]
    assert l8["dedupe_reprocessed"] is False
    assert config["sites"]["split"]["method"] == "blocks"
    assert config["dates"]["seasons"][0]["name"] == "spring"
    assert config["demo"]["cities"][0]["name"] == "toulouse"
    assert config["world"] == "real"
    # A default is a copy: filling one config must not change the next one.
    config["dates"]["seasons"].append({"name": "winter", "months": [1]})
    assert len(validate({}, sections=[])["dates"]["seasons"]) == 3


def test_a_sensor_is_checked_against_its_kind_and_catalogue() -> None:
    both = ["catalogs", "sensors"]
    # How to read the mask is not guessed from its name: one rule or the other must be given.
    with pytest.raises(ConfigError, match=r"'sensors\.l8\.mask': give exactly one of invalid_classes"):
        validate({"catalogs": PC, "sensors": {"l8": L8}}, sections=both)
    with pytest.raises(ConfigError, match=r"config key 'sensors\.l8\.mask': required but missing"):
        validate({"catalogs": PC, "sensors": {"l8": {k: v for k, v in L8.items() if k != "mask"}}}, sections=both)
    with pytest.raises(ConfigError, match=r"'sensors\.l8\.catalog': 'nowhere' is not one of catalogs \(pc\)"):
        validate({"catalogs": PC, "sensors": {"l8": {**L8, "catalog": "nowhere", "mask": {"asset": "qa",
                                                                                        "invalid_bits": [3]}}}},
                 sections=both)
    wms = {"pc": {"kind": "wms", "url": "http://127.0.0.1:1/wms"}}
    with pytest.raises(ConfigError, match=r"'sensors\.l8\.catalog': a stac_raster sensor is read from a stac "
                                          r"catalogue, 'pc' is wms"):
        validate({"catalogs": wms, "sensors": {"l8": {**L8, "mask": {"asset": "qa", "invalid_bits": [3]}}}},
                 sections=both)
    # A kind's keys only: a WMS sensor has no mask, a raster sensor no layers.
    with pytest.raises(ConfigError, match=r"'sensors\.l8\.layers': unknown key"):
        validate({"catalogs": PC, "sensors": {"l8": {**L8, "layers": []}}}, sections=both)
    real = load_config(CONFIG)
    with pytest.raises(ConfigError, match=r"'sensors\.ign\.bands\[4\]': 'SWIR' is in none of the layers' bands"):
        validate({"catalogs": real["catalogs"], "sensors": {
            "ign": {**real["sensors"]["ign"], "bands": ["R", "G", "B", "NIR", "SWIR"]}}}, sections=both)
    # Every key that names a sensor names one of `sensors` (a built store's) or of
    # msc_france.import_sensors (an imported store's); the message names both lists.
    with pytest.raises(ConfigError, match=r"'evaluate\.sensors\[0\]': 'modis' is not an image sensor of sensors "
                                          r"\(.*\) nor of msc_france\.import_sensors \(spot, sentinel, landsat\)"):
        load_config(CONFIG, {"evaluate": {"sensors": ["modis"]}})
    with pytest.raises(ConfigError, match=r"'catalog\.anchor_sensor': 'ign' is not a stac_raster sensor"):
        load_config(CONFIG, {"catalog": {"anchor_sensor": "ign"}})
    with pytest.raises(ConfigError, match=r"'build\.coregister_reference': 'labels' is not an image sensor"):
        load_config(CONFIG, {"build": {"coregister_reference": "labels"}})


def test_demo_world_swaps_in_loopback_endpoints_and_demo_sites() -> None:
    real = load_config(CONFIG)
    demo = load_config(CONFIG, {"world": "demo"})
    assert LOOPBACK.match(demo["catalogs"]["planetary_computer"]["url"])
    assert LOOPBACK.match(demo["catalogs"]["geoplateforme"]["url"])
    # Same signing path as against the real API: the SDK signs the demo's blob storage hrefs with
    # tokens of the gateway's, and GDAL reads them through the gateway (the blob hosts do not resolve).
    assert demo["catalogs"]["planetary_computer"]["signing"] == "planetary_computer"
    assert demo["catalogs"]["planetary_computer"]["token_url"] == "http://127.0.0.1:8765/api/sas/v1/token"
    assert real["catalogs"]["planetary_computer"]["token_url"] is None and real["http"]["proxy"] is None
    moved = load_config(CONFIG, {"world": "demo", "demo": {"port": 9000}})
    assert moved["http"]["proxy"] == "127.0.0.1:9000"
    assert moved["catalogs"]["planetary_computer"]["token_url"] == "http://127.0.0.1:9000/api/sas/v1/token"
    assert [city_name(c) for c in demo["sites"]["cities"]] == [city["name"] for city in demo["demo"]["cities"]]
    assert demo["sites"]["footprint_m"] < real["sites"]["footprint_m"]
    # What the overlay does not name is the real build's.
    assert demo["http"] == real["http"] | {"proxy": "127.0.0.1:8765"}
    assert demo["catalogs"]["geoplateforme"]["max_requests_per_s"] == real["catalogs"]["geoplateforme"][
        "max_requests_per_s"]
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
    config = load_config(CONFIG, {"catalogs": {"planetary_computer": {"url": url}}})
    assert config["catalogs"]["planetary_computer"]["url"] == url
    assert config["catalogs"]["planetary_computer"]["signing"] == "planetary_computer"
    assert config["http"]["max_retries"] == 6


def test_override_wins_over_the_world_overlay() -> None:
    url = "http://127.0.0.2:9000/stac"
    config = load_config(CONFIG, {"world": "demo", "catalogs": {"planetary_computer": {"url": url}}})
    assert config["catalogs"]["planetary_computer"]["url"] == url
    assert LOOPBACK.match(config["catalogs"]["geoplateforme"]["url"])


def test_snakemake_config_with_string_scalars_resolves_like_the_cli() -> None:
    """common.smk's path: `config` already holds the overrides, nested scalars are strings."""
    overrides = {"world": "demo", "http": {"max_retries": "3"}, "dates": {"end": "2023-09-30"}}
    typed = retype_snakemake_overrides(overrides)
    config = resolve_config(deep_merge(read_yaml(CONFIG), typed), typed)
    assert config["http"]["max_retries"] == 3
    assert config["dates"]["end"] == "2023-09-30"
    assert LOOPBACK.match(config["catalogs"]["planetary_computer"]["url"])
    typed_by_hand = {"world": "demo", "http": {"max_retries": 3}, "dates": {"end": "2023-09-30"}}
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
        ({"http": {"retries": 3}}, r"config key 'http\.retries': unknown key \(allowed here: "),
        ({"stacc": {}}, r"config key 'stacc': unknown key"),
        (
            {"sensors": {"s2": {"gsd_m": "ten"}}},
            r"config key 'sensors\.s2\.gsd_m': 'ten' is not of",
        ),
        ({"sensors": {"s2": {"gsd_m": -1}}}, r"config key 'sensors\.s2\.gsd_m': -1 is less than"),
        ({"seed": "abc"}, r"config key 'seed': 'abc' is not of type 'integer'"),
        ({"catalogs": {"planetary_computer": {"signing": "sas"}}},
         r"config key 'catalogs\.planetary_computer\.signing': 'sas' is not one of"),
        ({"world": "dmeo"}, r"config key 'world': 'dmeo' is not one of the worlds"),
        (
            {"sites": {"cities": ["lyon", "lyonn"]}},
            r"config key 'sites\.cities\[1\]': 'lyonn' is not",
        ),
        ({"dates": {"start": "2021-02-30"}}, r"config key 'dates\.start': '2021-02-30' is not a"),
        ({"dates": {"start": "2024-01-01"}}, r"config key 'dates': start 2024-01-01 is after end"),
        ({"sites": {"split": {"val_fraction": 0.5, "test_fraction": 0.5}}}, r"'sites\.split'"),
        ({"demo": {"stac_backend_port": 8765}}, r"config key 'demo\.stac_backend_port': must"),
        ({"sensors": {"ign": {"layers": [{"key": "rgb", "name": "ORTHO", "bands": ["R"]}]}}},
         r"config key 'sensors\.ign\.layers\[0\]\.name': 'ORTHO' does"),
    ],
)
def test_invalid_values_name_the_key_path(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, overrides)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIG, {"seed": -1, "catalogs": {"planetary_computer": {"page_limit": 5000}}})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert any("'seed'" in line for line in lines)
    assert any("'catalogs.planetary_computer.page_limit'" in line for line in lines)


def test_error_in_an_overlay_points_at_the_overlay() -> None:
    raw = read_yaml(CONFIG)
    raw["worlds"]["demo"]["catalogs"]["planetary_computer"]["urll"] = "http://127.0.0.1:1/stac"
    with pytest.raises(ConfigError, match=r"config key 'worlds\.demo\.catalogs\.planetary_computer\.urll': unknown key"):
        resolve_config(raw, {"world": "demo"})
    raw["worlds"]["demo"]["sites"]["cities"] = ["tolouse"]
    del raw["worlds"]["demo"]["catalogs"]["planetary_computer"]["urll"]
    with pytest.raises(ConfigError, match=r"'worlds\.demo\.sites\.cities\[0\]': 'tolouse'"):
        resolve_config(raw, {"world": "demo"})


def test_unquoted_yaml_dates_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    text = CONFIG.read_text().replace('start: "2021-04-01"', "start: 2021-05-01").replace(
        'end: "2023-10-31"', "end: 2021-09-30")
    path.write_text(text)
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
        # A dispatcher (`allOf` of if/then on `kind`) only names the kind; the schema its `then`
        # points at defines the object. An `if` is a condition, not a definition.
        if "properties" in node and "allOf" not in node:
            found.append((path, node))
        for key, value in node.items():
            if key != "if":
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
    assert validate({}, sections=[]) == validate(validate({}, sections=[]), sections=[])


def test_city_table_covers_the_configured_and_demo_cities() -> None:
    cities = load_cities()
    assert sorted(load_config(CONFIG)["sites"]["cities"]) == sorted(cities)
    for lon, lat in cities.values():  # mainland France
        assert -5.5 < lon < 10 and 41 < lat < 51.5
    # The demo cities sit where the real ones are, so demo sites fall inside them; one not in the
    # table (etercy, placed on the UTM 31/32 border) is given to the demo's sites with its place.
    demo = load_config(CONFIG, {"world": "demo"})
    for city in demo["demo"]["cities"]:
        if city["name"] in cities:
            assert cities[city["name"]] == (city["lon"], city["lat"])
        else:
            assert city in demo["sites"]["cities"], city


def test_footprint_must_be_whole_pixels_of_every_sensor() -> None:
    # 2240 m is 74.7 Landsat pixels at 30 m: the store could not hold the tile on a whole grid.
    with pytest.raises(ConfigError, match=r"'sensors\.l8\.gsd_m': sites\.footprint_m \(2240\) is 74\.667 pixels"):
        validate({"sensors": {"l8": {**L8, "mask": {"asset": "qa", "invalid_bits": [3]}, "gsd_m": 30}}},
                 sections=["sites", "sensors"])
    assert load_config(CONFIG, {"world": "demo"})["sensors"]["l8"]["gsd_m"] == 30  # 480 m = 16 px
