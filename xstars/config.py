"""Load, resolve and validate the pipeline configuration.

Resolution, later wins::

    config.yaml                the top-level values describe the real MSC-France build
    worlds[<world>]            an overlay, e.g. the demo world's loopback endpoints
    overrides                  snakemake --config/--configfile, ``xstars ... --set a.b=VALUE``

Mappings are merged key by key; lists and scalars are replaced whole. The result is validated
against ``xstars/schemas/config.schema.yaml`` (JSON Schema 2020-12), which fills in defaults and
rejects unknown keys; a few cross-key rules the schema cannot express are checked after it.
Every problem is reported as a :class:`~xstars.errors.ConfigError` naming the key path.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from xstars.errors import ConfigError

#: Where the CLI looks for the configuration when no path is given (the working directory).
DEFAULT_CONFIG = Path("config.yaml")

_SCHEMA_RESOURCE = ("schemas", "config.schema.yaml")
_CITIES_RESOURCE = ("resources", "cities.csv")


def load_yaml(text: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, with libyaml's parser when PyYAML has it: the schema
    alone took the pure-Python parser most of a second, at the start of every job."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def load_schema() -> dict[str, Any]:
    """The configuration schema shipped in the package (treat as read-only: it is cached)."""
    text = resources.files("xstars").joinpath(*_SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return load_yaml(text)


@functools.cache
def load_cities() -> dict[str, tuple[float, float]]:
    """City table shipped in the package: name -> (lon, lat) in WGS84 degrees."""
    text = resources.files("xstars").joinpath(*_CITIES_RESOURCE).read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines())
    return {row["name"]: (float(row["lon"]), float(row["lat"])) for row in rows}


def city_name(entry: str | Mapping[str, Any]) -> str:
    """Name of a ``sites.cities`` entry: a name from cities.csv, or ``{name, lon, lat}``."""
    return entry if isinstance(entry, str) else entry["name"]


def city_lonlat(entry: str | Mapping[str, Any]) -> tuple[float, float]:
    """(lon, lat) of a ``sites.cities`` entry (looked up in cities.csv for a bare name)."""
    if isinstance(entry, str):
        return load_cities()[entry]
    return float(entry["lon"]), float(entry["lat"])


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a YAML config, apply its world overlay and ``overrides``, validate, fill defaults.

    Args:
        path: YAML file; ``config.yaml`` in the working directory when None.
        overrides: Nested mapping merged last, e.g. ``{"world": "demo"}``.

    Raises:
        ConfigError: unreadable file, unknown world, or a value the schema rejects.
    """
    return resolve_config(read_yaml(DEFAULT_CONFIG if path is None else Path(path)), overrides)


def resolve_config(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict:
    """Resolve and validate an in-memory config (what Snakemake's ``config`` holds).

    ``config`` may already contain ``overrides`` (Snakemake merges ``--config`` into it before
    the Snakefile runs); they are applied once more after the world overlay so that they win.
    """
    overrides = _dates_to_iso(overrides or {})
    merged = deep_merge(_dates_to_iso(config), overrides)
    # Checked before resolving so that a malformed `world`/`worlds` gets a schema message.
    _raise_on(_schema_errors(merged, fill_defaults=False))
    resolved = resolve_world(merged, overrides)
    overlay = merged.get("worlds", {}).get(merged.get("world", "real"), {})
    return expand_demo_address(validate(resolved, overlay=overlay, overrides=overrides))


#: The config sections a dataset build reads (catalog and build stages): a rebuild with the same
#: values stores the same bytes; the dataset card hashes them.
BUILD_SECTIONS: tuple[str, ...] = ("world", "seed", "results_dir", "http", "catalogs", "sensors", "sites", "catalog",
                                   "build", "dates", "demo")


def expand_demo_address(config: dict) -> dict:
    """Replace ``{demo.host}`` and ``{demo.port}`` in the endpoint URLs by the demo's values, and
    ``{demo.root}`` in the paths of ``evaluate.benchmarks``.

    The demo overlay writes its URLs this way, so that moving the demo servers to another port
    (``--config demo.port=9000``, as the tests do) moves every endpoint with them.
    """
    values = {"{demo.host}": str(config["demo"]["host"]), "{demo.port}": str(config["demo"]["port"])}

    def expand(text: str) -> str:
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        return text

    for catalog in config.get("catalogs", {}).values():
        catalog["url"] = expand(catalog["url"])
        if catalog.get("token_url"):
            catalog["token_url"] = expand(catalog["token_url"])
    if config.get("http", {}).get("proxy"):
        config["http"]["proxy"] = expand(config["http"]["proxy"])
    # The demo's benchmark copies are generated under its root (xstars demo benchmarks).
    for spec in config.get("evaluate", {}).get("benchmarks", []):
        spec["path"] = spec["path"].replace("{demo.root}", str(config["demo"]["root"]))
    return config


def resolve_world(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict:
    """Deep-merge ``worlds[world]`` over ``config``, drop ``worlds``, then re-apply ``overrides``.

    ``world`` stays in the result so that later stages know which world they run in.
    """
    worlds = config.get("worlds", {"real": {}})
    world = config.get("world", "real")
    if world not in worlds:
        raise ConfigError(
            f"config key 'world': {world!r} is not one of the worlds defined under 'worlds' "
            f"({', '.join(sorted(worlds)) or 'none'})"
        )
    base = {key: value for key, value in config.items() if key != "worlds"}
    return deep_merge(deep_merge(base, worlds[world]), overrides or {})


def validate(
    config: dict,
    *,
    overlay: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sections: Iterable[str] | None = None,
) -> dict:
    """Validate a resolved config in place, filling defaults; return it.

    Args:
        config: Resolved config (``worlds`` may be present or not).
        overlay: The world overlay it was resolved with. A bad value that came from it, and not
            from ``overrides``, is reported as ``worlds.<world>.<key>``: the line to fix.
        overrides: The overrides applied after the overlay.
        sections: The sections given, when only some are (``--config-json``): the rules across
            sections are checked only between those. None: every section counts as given.

    Raises:
        ConfigError: one line per problem, each naming its key path.
    """
    given = None if sections is None else list(sections)
    errors = list(_schema_errors(config, fill_defaults=True))
    if not errors:
        errors = list(_consistency_errors(config, given))
    world_prefix = ("worlds", str(config.get("world", "real")))

    def located(parts: tuple) -> tuple:
        from_overlay = _defined_in(parts, overlay) and not _defined_in(parts, overrides)
        return world_prefix + parts if from_overlay else parts

    _raise_on((located(parts), message) for parts, message in errors)
    return config


def run_settings(config: Mapping[str, Any], run: str) -> dict:
    """The pretraining settings of ``run``: ``pretrain.runs[run]`` deep-merged over the shared
    ``pretrain`` values, validated (defaults filled) and checked for consistency.

    Raises ConfigError naming ``pretrain.runs.<run>.<key>`` for a bad value.
    """
    pretrain = config["pretrain"]
    if run not in pretrain["runs"]:
        raise ConfigError(f"config key 'pretrain.runs': no run named {run!r} (runs: {', '.join(pretrain['runs'])})")
    settings, errors = _run_settings(pretrain, run)
    _raise_on(errors)
    return settings


def _run_settings(pretrain: Mapping[str, Any], run: str) -> tuple[dict, list[_Error]]:
    shared = {k: v for k, v in pretrain.items() if k not in ("runs", "resources")}
    settings = deep_merge(shared, pretrain["runs"][run])
    schema = copy.deepcopy(load_schema()["properties"]["pretrain"])
    for key in ("runs", "resources"):
        schema["properties"].pop(key)
    prefix = ("pretrain", "runs", run)
    errors = [(prefix + parts, msg) for error in _DefaultFillingValidator(schema).iter_errors(settings)
              for parts, msg in _describe(error)]
    if not errors:
        errors = [(prefix + parts, msg) for parts, msg in _run_errors(settings, run, pretrain["runs"])]
    return settings, errors


def _run_errors(settings: Mapping[str, Any], run: str, runs: Mapping[str, Any]) -> Iterator[_Error]:
    sensors = settings["sensors"]
    for i, sensor in enumerate(settings["dino_sensors"]):
        if sensor not in sensors:
            yield ("dino_sensors", i), f"{sensor!r} is not one of pretrain sensors {sensors}"
    if settings["mode"] == "scratch" and settings["msad"]["alpha"] > 0 and len(sensors) < 2:
        yield ("msad", "alpha"), f"MSAD aligns sensors: it needs two, sensors is {sensors} (set alpha: 0)"
    if settings["mode"] == "continual":
        continual = settings["continual"]
        if continual["source_sensor"] not in sensors:
            yield ("continual", "source_sensor"), f"{continual['source_sensor']!r} must be one of sensors {sensors}"
        if continual["source_sensor"] in settings["dino_sensors"]:
            yield ("dino_sensors",), f"the source sensor {continual['source_sensor']!r} is frozen: not a DINO sensor"
        if bool(continual["checkpoint"]) == bool(continual["from_run"]):
            yield ("continual",), "give exactly one of checkpoint or from_run"
        if continual["from_run"] and (continual["from_run"] not in runs or continual["from_run"] == run):
            yield ("continual", "from_run"), f"{continual['from_run']!r} is not another run of pretrain.runs"
    low, high = settings["views"]["global_scale"]
    if low > high:
        yield ("views", "global_scale"), f"{low} > {high}"
    low, high = settings["views"]["local_scale"]
    if low > high:
        yield ("views", "local_scale"), f"{low} > {high}"


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict:
    """A new dict: ``overlay`` over ``base``; mappings merge recursively, other values replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; ConfigError naming the file when missing, malformed or not a mapping."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found (pass --config PATH)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}"
        )
    return data


def parse_override(assignment: str) -> dict:
    """``"a.b=VALUE"`` -> ``{"a": {"b": VALUE}}``, VALUE read as YAML (``3`` is an int)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {assignment!r} must look like KEY.SUBKEY=VALUE")
    try:
        value: Any = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML: {err}") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def retype_snakemake_overrides(overrides: Mapping[str, Any]) -> dict:
    """Re-read the string scalars of Snakemake's ``--config`` values as YAML.

    Snakemake parses a nested ``--config`` value with YAML's BaseLoader, which leaves every
    scalar a string (``--config "stac={max_retries: 3}"`` gives ``'3'``). A string that reads
    as another scalar (number, boolean, date) becomes that; anything else is kept as it was.
    """

    def retype(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {key: retype(value) for key, value in node.items()}
        if isinstance(node, list):
            return [retype(value) for value in node]
        if isinstance(node, str):
            try:
                value = yaml.safe_load(node)
            except yaml.YAMLError:
                return node
            return value if isinstance(value, int | float | bool | dt.date) else node
        return node

    return retype(overrides)


def key_path(parts: Sequence[str | int]) -> str:
    """``["sites", "cities", 2]`` -> ``"sites.cities[2]"``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- internals ---------------------------------------------------------------------------------

_Error = tuple[tuple[str | int, ...], str]  # (key path parts, message)


def _raise_on(errors: Iterable[_Error]) -> None:
    lines = sorted(
        {
            f"config key '{key_path(parts)}': {msg}" if parts else f"config: {msg}"
            for parts, msg in errors
        }
    )
    if lines:
        raise ConfigError("\n".join(lines))


def _schema_errors(config: Any, *, fill_defaults: bool) -> Iterator[_Error]:
    validator_cls = _DefaultFillingValidator if fill_defaults else jsonschema.Draft202012Validator
    for error in validator_cls(load_schema()).iter_errors(config):
        yield from _describe(error)


def _describe(error: jsonschema.ValidationError) -> Iterator[_Error]:
    """Turn a jsonschema error into (key path, message), naming the offending key itself."""
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        for key in sorted(set(error.instance) - set(allowed)):
            yield (*path, key), f"unknown key (allowed here: {', '.join(allowed)})"
    elif error.validator == "required" and isinstance(error.instance, dict):
        for key in error.validator_value:
            if key not in error.instance:
                yield (*path, key), "required but missing"
    else:
        yield path, error.message


def _defined_in(parts: tuple, mapping: Mapping[str, Any] | None) -> bool:
    """Whether ``mapping`` sets the value at ``parts`` (setting a list sets all its items)."""
    node: Any = mapping
    for part in parts:
        if isinstance(part, int) and isinstance(node, list):
            return True
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return bool(parts)


def _consistency_errors(config: dict, sections: Iterable[str] | None = None) -> Iterator[_Error]:
    """Rules across keys that the schema cannot state (run on a schema-valid config).

    ``sections``: the sections actually given (a rule's ``--config-json`` holds only those its
    command reads); a rule is checked only when every section it involves is given. None: all.
    """
    given = set(config) if sections is None else set(sections)
    for needed, check in _CHECKS:
        if set(needed) <= given:
            yield from check(config)


def _site_errors(config: dict) -> Iterator[_Error]:
    known = load_cities()
    for i, city in enumerate(config["sites"]["cities"]):
        if isinstance(city, str) and city not in known:
            known_names = ", ".join(sorted(known))
            yield (
                ("sites", "cities", i),
                f"{city!r} is not in xstars/resources/cities.csv (known: {known_names})",
            )
    sites = config["sites"]
    split = sites["split"]
    names = [city_name(c) for c in sites["cities"]]
    if len(set(names)) != len(names):
        yield ("sites", "cities"), f"city names must be unique, got {names}"
    if split["method"] == "blocks" or sites["uniform_count"] > 0:
        ratio = split["block_m"] / sites["footprint_m"]
        if abs(ratio - round(ratio)) > 1e-9:
            yield (
                ("sites", "split", "block_m"),
                (f"{split['block_m']:g} must be a multiple of sites.footprint_m ({sites['footprint_m']:g}) "
                "so that blocks never cut a footprint"),
            )
    for key in ("val_cities", "test_cities"):
        for i, city in enumerate(split[key]):
            if city not in names:
                yield ("sites", "split", key, i), f"{city!r} is not one of sites.cities"
    both = set(split["val_cities"]) & set(split["test_cities"])
    if both:
        yield ("sites", "split", "test_cities"), f"{sorted(both)} also in val_cities"
    if split["method"] == "cities" and not set(names) - set(split["val_cities"]) - set(
        split["test_cities"]
    ):
        yield ("sites", "split", "method"), "every city is in val_cities or test_cities: none left to train on"
    if split["val_fraction"] + split["test_fraction"] >= 1:
        yield (
            ("sites", "split"),
            "val_fraction + test_fraction must be below 1 (nothing left to train on)",
        )


def _footprint_errors(config: dict) -> Iterator[_Error]:
    sites = config["sites"]
    for name, sensor in config["sensors"].items():
        # Every sensor is stored on the footprint's grid at its own gsd (warped to sites.crs):
        # the footprint must be a whole number of its pixels.
        pixels = sites["footprint_m"] / sensor["gsd_m"]
        if abs(pixels - round(pixels)) > 1e-6:
            yield (
                ("sensors", name, "gsd_m"),
                (f"sites.footprint_m ({sites['footprint_m']:g}) is {pixels:.3f} pixels of {sensor['gsd_m']:g} m: "
                 "pick a gsd_m that divides the footprint"),
            )


def _demo_city_errors(config: dict) -> Iterator[_Error]:
    if config["world"] == "demo":
        demo_names = {city["name"] for city in config["demo"]["cities"]}
        for i, city in enumerate(city_name(c) for c in config["sites"]["cities"]):
            if city not in demo_names:
                yield ("sites", "cities", i), f"{city!r} is not a city of the demo world (demo.cities)"


def _date_errors(config: dict) -> Iterator[_Error]:
    dates = config["dates"]
    parsed = {}
    for key in ("start", "end"):
        try:
            parsed[key] = dt.date.fromisoformat(dates[key])
        except ValueError:
            yield ("dates", key), f"{dates[key]!r} is not a calendar date (YYYY-MM-DD)"
    if len(parsed) == 2 and parsed["start"] > parsed["end"]:
        yield ("dates",), f"start {dates['start']} is after end {dates['end']}"
    names = [season["name"] for season in dates["seasons"]]
    if len(set(names)) != len(names):
        yield ("dates", "seasons"), f"season names must be unique, got {names}"


def _run_config_errors(config: dict) -> Iterator[_Error]:
    for run in config["pretrain"]["runs"]:
        yield from _run_settings(config["pretrain"], run)[1]


def _evaluate_errors(config: dict) -> Iterator[_Error]:
    evaluate = config["evaluate"]
    for i, model in enumerate(evaluate["models"]):
        if model not in config["pretrain"]["runs"]:
            yield ("evaluate", "models", i), f"{model!r} is not a run of pretrain.runs"
    if evaluate["include_random"] and "random" in config["pretrain"]["runs"]:
        yield ("pretrain", "runs", "random"), "`random` names the randomly initialised baseline: rename the run"


def _demo_errors(config: dict) -> Iterator[_Error]:
    demo = config["demo"]
    if demo["port"] == demo["stac_backend_port"]:
        yield ("demo", "stac_backend_port"), f"must differ from demo.port ({demo['port']})"
    demo_names = [city["name"] for city in demo["cities"]]
    if len(set(demo_names)) != len(demo_names):
        yield ("demo", "cities"), f"city names must be unique, got {demo_names}"


#: The kind of catalogue each kind of sensor is read from.
_CATALOG_KIND = {"stac_raster": "stac", "stac_labels": "stac", "wms_layers": "wms"}


def _images(config: dict) -> list[str]:
    return [name for name, s in config["sensors"].items() if s["kind"] != "stac_labels"]


def _sensor_errors(config: dict) -> Iterator[_Error]:
    """Sensors against their catalogues and their own keys."""
    sensors, catalogs = config["sensors"], config["catalogs"]
    labels = [name for name, s in sensors.items() if s["kind"] == "stac_labels"]
    for name, sensor in sensors.items():
        catalog = catalogs.get(sensor["catalog"])
        if catalog is None:
            yield ("sensors", name, "catalog"), f"{sensor['catalog']!r} is not one of catalogs ({', '.join(catalogs)})"
        elif catalog["kind"] != _CATALOG_KIND[sensor["kind"]]:
            yield (("sensors", name, "catalog"),
                   (f"a {sensor['kind']} sensor is read from a {_CATALOG_KIND[sensor['kind']]} catalogue, "
                    f"{sensor['catalog']!r} is {catalog['kind']}"))
        if sensor["kind"] == "stac_raster":
            given = [k for k in ("invalid_classes", "invalid_bits") if k in sensor["mask"]]
            if len(given) != 1:
                yield ("sensors", name, "mask"), "give exactly one of invalid_classes or invalid_bits"
        if sensor["kind"] == "wms_layers":
            keys = [layer["key"] for layer in sensor["layers"]]
            if len(set(keys)) != len(keys):
                yield ("sensors", name, "layers"), f"layer keys must be unique, got {keys}"
            offered = {band for layer in sensor["layers"] for band in layer["bands"]}
            for i, band in enumerate(sensor["bands"]):
                if band not in offered:
                    yield ("sensors", name, "bands", i), f"{band!r} is in none of the layers' bands {sorted(offered)}"
        if sensor["kind"] != "stac_labels":
            if sensor["units"]["rule"] in ("scale", "raster_bands") and "scale" not in sensor["units"]:
                yield (("sensors", name, "units", "scale"),
                       f"required by rule {sensor['units']['rule']!r} (raster_bands: when an asset declares none)")
            band = sensor.get("coregister_band")
            if band is not None and band not in sensor["bands"]:
                yield ("sensors", name, "coregister_band"), f"{band!r} is not one of its bands {sensor['bands']}"
            for i, band in enumerate(sensor.get("rgb_bands", [])):
                if band not in sensor["bands"]:
                    yield ("sensors", name, "rgb_bands", i), f"{band!r} is not one of its bands {sensor['bands']}"
    if len(labels) > 1:
        yield ("sensors",), f"at most one stac_labels sensor (the labels), got {labels}"


def _anchor_errors(config: dict) -> Iterator[_Error]:
    sensors, anchor = config["sensors"], config["catalog"]["anchor_sensor"]
    if anchor not in sensors or sensors[anchor]["kind"] != "stac_raster":
        raster = [n for n, s in sensors.items() if s["kind"] == "stac_raster"]
        yield ("catalog", "anchor_sensor"), f"{anchor!r} is not a stac_raster sensor of sensors ({', '.join(raster)})"


def _coregister_errors(config: dict) -> Iterator[_Error]:
    images, reference = _images(config), config["build"]["coregister_reference"]
    if reference not in images:
        yield ("build", "coregister_reference"), f"{reference!r} is not an image sensor of sensors ({', '.join(images)})"
        return
    for name in images:
        if not config["sensors"][name].get("coregister_band"):
            yield (("sensors", name, "coregister_band"),
                   f"required: every image sensor is compared with {reference!r} on one band")


def _named_sensor_errors(section: str) -> Callable[[dict], Iterator[_Error]]:
    """Every key of ``section`` (pretrain, evaluate) that names a sensor must name an image sensor:
    one of ``sensors`` (a built store's groups) or of ``msc_france.import_sensors`` (an imported
    store's, named apart since they hold 8-bit RGB); which of them the store has, its reader checks."""

    def check(config: dict) -> Iterator[_Error]:
        images, cfg = _images(config), config[section]
        imported = [entry["sensor"] for entry in config["msc_france"]["import_sensors"].values()]
        named: list[tuple[tuple, str]] = []
        if section == "pretrain":
            named += [(("pretrain", "sensors", i), s) for i, s in enumerate(cfg["sensors"])]
            named += [(("pretrain", "dino_sensors", i), s) for i, s in enumerate(cfg["dino_sensors"])]
            for run, overlay in cfg["runs"].items():
                for key in ("sensors", "dino_sensors"):
                    named += [(("pretrain", "runs", run, key, i), s) for i, s in enumerate(overlay.get(key, []))]
        else:
            named += [(("evaluate", "sensors", i), s) for i, s in enumerate(cfg["sensors"])]
            named += [(("evaluate", "benchmarks", i, "sensor"), e["sensor"]) for i, e in enumerate(cfg["benchmarks"])]
        for parts, name in named:
            if name not in images and name not in imported:
                yield parts, (f"{name!r} is not an image sensor of sensors ({', '.join(images)}) nor of "
                              f"msc_france.import_sensors ({', '.join(imported)})")

    return check


def _benchmark_errors(config: dict) -> Iterator[_Error]:
    if config["evaluate"]["benchmarks"]:
        from xstars.benchmarks import spec_errors

        yield from spec_errors(config["evaluate"]["benchmarks"], list(config["sensors"]))


#: (sections involved, check): a check runs when all its sections are given.
_CHECKS: tuple[tuple[tuple[str, ...], Callable[[dict], Iterator[_Error]]], ...] = (
    (("sites",), _site_errors),
    (("sites", "sensors"), _footprint_errors),
    (("sensors", "catalogs"), _sensor_errors),
    (("sensors", "catalog"), _anchor_errors),
    (("sensors", "build"), _coregister_errors),
    (("sensors", "msc_france", "pretrain"), _named_sensor_errors("pretrain")),
    (("sensors", "msc_france", "evaluate"), _named_sensor_errors("evaluate")),
    (("sensors", "evaluate"), _benchmark_errors),
    (("world", "demo", "sites"), _demo_city_errors),
    (("dates",), _date_errors),
    (("pretrain",), _run_config_errors),
    (("evaluate", "pretrain"), _evaluate_errors),
    (("demo",), _demo_errors),
)


def _dates_to_iso(node: Any) -> Any:
    """YAML reads an unquoted 2021-04-01 as a date: keep it as the ISO string the schema expects."""
    if isinstance(node, Mapping):
        return {key: _dates_to_iso(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_dates_to_iso(value) for value in node]
    if isinstance(node, dt.date):
        return node.isoformat()
    return node


def _extend_with_defaults(cls: type) -> type:
    """A validator class that, before checking an object's properties, fills missing defaults.

    Defaults are deep-copied (the schema is cached and shared). An object filled with its
    default (often ``{}``) is then descended into, so nested defaults are filled too.
    """
    check_properties = cls.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, schema):
        if validator.is_type(instance, "object"):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": fill_then_check})


_DefaultFillingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def run_bands(settings: Mapping[str, Any]) -> dict[str, list[str]] | None:
    """The bands per sensor a run reads (``rgb_only`` or ``bands``); None = every stored band."""
    if settings["rgb_only"]:
        missing = [s for s in settings["sensors"] if s not in settings["rgb_bands"]]
        if missing:
            raise ConfigError(f"config key 'pretrain.rgb_bands': rgb_only needs the red, green and blue bands of "
                              f"{', '.join(missing)}")
        return {s: list(settings["rgb_bands"][s]) for s in settings["sensors"]}
    return {s: list(b) for s, b in settings["bands"].items() if s in settings["sensors"]} or None
