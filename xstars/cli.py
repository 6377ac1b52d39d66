"""The ``xstars`` command line: what the Snakemake rules call, and what a person types.

::

    xstars config show [--config config.yaml] [--world demo] [--set stac.url=http://...]
    xstars demo generate [--root DIR] [--config config.yaml | --demo-json JSON]
    xstars demo up|down|status [--root DIR] [--config config.yaml]
    xstars demo preview --root DIR --out preview.png
    xstars demo benchmarks --out DIR [--seed N] [--layouts eurosat_ms,flair]
    xstars catalog sites --out sites.parquet
    xstars catalog search --sites sites.parquet --shard I --out shard-I.parquet   # + shard-I.items/, .rows
    xstars catalog items --sensor s2 --out items/s2.parquet shard-*.parquet   # one sensor's items, merged
    xstars catalog manifest --sites sites.parquet --out manifest.parquet [--items items/] shard-*.parquet   # + manifest.items/
    xstars catalog freeze --out manifest.parquet      # frozen mode: check and copy catalog.manifest
    xstars catalog convert --manifest OLD --out NEW   # a layout-1 manifest (item JSON in rows) to this layout
    xstars catalog wms-layers                         # configured WMS layers: which years are live
    xstars build init --manifest M --store dataset.zarr --out init.json
    xstars build part --manifest M --store dataset.zarr --part K --out part-K.json
    xstars build finalize --manifest M --store dataset.zarr --out summary.json part-*.json
    xstars build verify --manifest M --store dataset.zarr --out verify.json
    xstars build publish --manifest M --store dataset.zarr --out-dir DIR   # card, STAC, Croissant
    xstars pretrain run --store dataset.zarr --run NAME --out-dir DIR [--nproc N] [--max-steps K]
    xstars pretrain figure --out losses.png RUN/metrics.jsonl...
    xstars evaluate model --store dataset.zarr --model NAME --runs-dir results/pretrain --out NAME.json
    xstars evaluate report --store dataset.zarr --out-dir results/evaluate MODEL.json...
    xstars import msc-france DIR [--out dataset.zarr]    # the released layout -> a store
    xstars export msc-france STORE DIR                   # a store -> the released layout

Every command that reads the configuration takes ``--config FILE [--world W] [--set K=V]`` or
``--config-json JSON`` (the resolved config, or the sections a rule needs, as the workflow
passes them). Each command declares the sections it reads (:data:`SECTIONS`): a
``--config-json`` lacking one is refused, never silently filled with defaults. With ``world: demo`` the commands that talk to the services start the demo
servers first if they are not up (``xstars demo down`` stops them).

Errors raised on purpose (:class:`~xstars.errors.XstarsError`) print ``error: <message>`` and exit
with status 2, without a traceback; anything else is a bug and keeps its traceback (exit 1). Both are
redacted (:mod:`xstars.redaction`): no SAS token reaches stderr, the Snakemake job logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from xstars import __version__, redaction
from xstars.config import (
    BUILD_SECTIONS,
    deep_merge,
    expand_demo_address,
    load_config,
    parse_override,
    validate,
)
from xstars.errors import ConfigError, XstarsError

log = logging.getLogger("xstars.cli")

#: Environment variable carrying the command to the processes torchrun starts (torchrun's own
#: parser would take options such as --run or --nproc as abbreviations of its own).
TORCHRUN_ARGV = "XSTARS_TORCHRUN_ARGV"

#: Exit status for an error the user can fix (bad config, service down...), as argparse uses.
EXIT_USAGE = 2

#: The config sections each command reads ("group command" -> sections). A rule passes exactly
#: these through ``--config-json`` (tests/test_workflow.py checks every rule against this table).
_SERVICES = ("world", "demo", "http", "catalogs")
SECTIONS: dict[str, tuple[str, ...]] = {
    "config show": (),
    "demo generate": ("demo",),
    "demo up": ("demo",),
    "demo down": ("demo",),
    "demo status": ("demo",),
    "catalog sites": ("seed", "sites", "sensors"),
    "catalog search": (*_SERVICES, "seed", "sites", "sensors", "dates", "catalog"),
    # build: the manifest's row groups are the build parts (build.samples_per_shard sites each)
    "catalog items": ("sensors", "catalogs"),
    "catalog manifest": ("seed", "sites", "catalogs", "sensors", "dates", "catalog", "build"),
    "catalog freeze": ("catalog",),
    "catalog convert": ("build",),
    "catalog wms-layers": (*_SERVICES, "sensors"),
    "build init": ("sites", "catalogs", "sensors", "build", "catalog"),
    "build part": (*_SERVICES, "sites", "sensors", "build", "catalog"),
    "build group": (*_SERVICES, "sites", "sensors", "build", "catalog"),
    "build finalize": ("sites", "catalogs", "sensors", "build", "catalog"),
    "build publish": (*BUILD_SECTIONS, "publish"),
    "import msc-france": ("results_dir", "msc_france"),
    "export msc-france": ("msc_france",),
    "pretrain run": ("seed", "pretrain"),
    "evaluate model": ("seed", "pretrain", "evaluate"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xstars`` console script; returns the exit status."""
    if argv is None and len(sys.argv) == 1 and TORCHRUN_ARGV in os.environ:
        argv = json.loads(os.environ[TORCHRUN_ARGV])  # a process started by `pretrain run --nproc N`
    args = build_parser().parse_args(argv)
    args.sections = SECTIONS.get(f"{args.group} {getattr(args, 'command', '')}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what torchrun re-runs in each process
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # stderr is what Snakemake keeps as the job's log: no SAS token may reach it, from any
    # logger at any level, from a warning, the error line or a bug's traceback.
    redaction.install()
    logging.captureWarnings(True)
    try:
        return args.func(args) or 0
    except XstarsError as err:
        print(f"error: {redaction.redact(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - a bug: its traceback, redacted, and the status Python gives one
        import traceback

        sys.stderr.write(redaction.redact(traceback.format_exc()))
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (one sub-parser per command, each bound to its function)."""
    parser = argparse.ArgumentParser(
        prog="xstars",
        description="Rebuild a multi-sensor EO dataset over France and pretrain X-STARS models.",
    )
    parser.add_argument("--version", action="version", version=f"xstars {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (logs go to stderr; default: %(default)s)",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{config,demo,catalog,build,pretrain,evaluate,import,export}")

    config_opts = _config_options()
    config_cmds = groups.add_parser("config", help="inspect the configuration").add_subparsers(
        dest="command", required=True
    )
    show = config_cmds.add_parser(
        "show", parents=[config_opts], help="print the resolved, validated config as YAML"
    )
    show.set_defaults(func=cmd_config_show)

    demo_cmds = groups.add_parser("demo", help="the offline demo world").add_subparsers(
        dest="command", required=True
    )
    root_opt = argparse.ArgumentParser(add_help=False)
    root_opt.add_argument("--root", type=Path, help="demo world folder (default: config demo.root)")

    generate = demo_cmds.add_parser(
        "generate", parents=[config_opts, root_opt], help="generate the synthetic world"
    )
    generate.add_argument(
        "--demo-json",
        metavar="JSON",
        help="the `demo` config section as JSON instead of --config (what the workflow passes)",
    )
    generate.set_defaults(func=cmd_demo_generate)
    for name, func, text in [
        ("up", cmd_demo_up, "start (or reuse) the loopback STAC/files/WMS servers"),
        ("down", cmd_demo_down, "stop the servers"),
        ("status", cmd_demo_status, "say whether the servers answer (exit 1 when down)"),
    ]:
        demo_cmds.add_parser(name, parents=[config_opts, root_opt], help=text).set_defaults(
            func=func
        )
    benchmarks = demo_cmds.add_parser("benchmarks", help="fake copies of the public benchmarks, in their layouts")
    benchmarks.add_argument("--out", type=Path, required=True, help="folder of the copies (benchmarks.json lists them)")
    benchmarks.add_argument("--seed", type=int, default=0, help="seed of the pixels (default: %(default)s)")
    benchmarks.add_argument("--layouts", default="", help="comma-separated layouts (default: all)")
    benchmarks.set_defaults(func=cmd_demo_benchmarks)
    preview = demo_cmds.add_parser("preview", help="render a PNG overview of a generated world")
    preview.add_argument("--root", type=Path, required=True, help="demo world folder")
    preview.add_argument("--out", type=Path, required=True, help="PNG to write")
    preview.set_defaults(func=cmd_demo_preview)

    catalog_cmds = groups.add_parser("catalog", help="sites, STAC search, scene selection").add_subparsers(
        dest="command", required=True
    )
    sites = catalog_cmds.add_parser("sites", parents=[config_opts], help="draw the sites (GeoParquet)")
    sites.add_argument("--out", type=Path, required=True)
    sites.set_defaults(func=cmd_catalog_sites)
    search = catalog_cmds.add_parser("search", parents=[config_opts], help="search one shard of sites")
    search.add_argument("--sites", type=Path, required=True, help="sites.parquet")
    search.add_argument("--shard", type=int, required=True, help="shard index, 0..catalog.search_shards-1")
    search.add_argument("--out", type=Path, required=True,
                        help="candidates (Parquet); the items go beside it, in <out stem>.items/")
    search.set_defaults(func=cmd_catalog_search)
    manifest = catalog_cmds.add_parser("manifest", parents=[config_opts], help="select scenes, write the manifest")
    manifest.add_argument("--sites", type=Path, required=True, help="sites.parquet")
    manifest.add_argument("--out", type=Path, required=True, help="manifest.parquet")
    manifest.add_argument("--summary", type=Path, help="also write the kept/dropped counts as JSON")
    manifest.add_argument("--items", type=Path,
                          help="folder of the items jobs' <sensor>.parquet (`catalog items`); without it the "
                               "items are merged by this job")
    manifest.add_argument("candidates", type=Path, nargs="+", help="candidate files of every shard")
    manifest.set_defaults(func=cmd_catalog_manifest)
    items = catalog_cmds.add_parser("items", parents=[config_opts],
                                    help="merge one sensor's items from the search shards (for the manifest)")
    items.add_argument("--sensor", required=True, help="a sensor of the config")
    items.add_argument("--out", type=Path, required=True, help="<sensor>.parquet (stac-geoparquet)")
    items.add_argument("candidates", type=Path, nargs="+", help="candidate files of every shard")
    items.set_defaults(func=cmd_catalog_items)
    convert = catalog_cmds.add_parser("convert", parents=[config_opts],
                                      help="a manifest of layout 1 (item JSON in every row) to this layout")
    convert.add_argument("--manifest", type=Path, required=True, help="the old manifest.parquet")
    convert.add_argument("--out", type=Path, required=True, help="the new manifest (its items go in <stem>.items/)")
    convert.set_defaults(func=cmd_catalog_convert)
    freeze = catalog_cmds.add_parser("freeze", parents=[config_opts],
                                     help="frozen mode: check catalog.manifest and copy it (no search)")
    freeze.add_argument("--out", type=Path, required=True, help="manifest.parquet")
    freeze.add_argument("--summary", type=Path, help="also write the kept/dropped counts as JSON")
    freeze.set_defaults(func=cmd_catalog_freeze)
    layers = catalog_cmds.add_parser("wms-layers", parents=[config_opts],
                                     help="each WMS sensor's configured layers and years against GetCapabilities")
    layers.set_defaults(func=cmd_catalog_wms_layers)
    plot = catalog_cmds.add_parser("plot", help="figure of the manifest for the report (PNG)")
    plot.add_argument("--manifest", type=Path, required=True)
    plot.add_argument("--out", type=Path, required=True)
    plot.set_defaults(func=cmd_catalog_plot)

    build_cmds = groups.add_parser("build", help="the Zarr store from the manifest").add_subparsers(
        dest="command", required=True
    )
    store_opts = argparse.ArgumentParser(add_help=False)
    store_opts.add_argument("--manifest", type=Path, required=True, help="manifest.parquet")
    store_opts.add_argument("--store", type=Path, required=True, help="the Zarr store (a folder)")
    store_opts.add_argument("--out", type=Path, required=True, help="JSON record of the step")
    init = build_cmds.add_parser("init", parents=[config_opts, store_opts], help="create the store's arrays")
    init.set_defaults(func=cmd_build_init)
    part = build_cmds.add_parser("part", parents=[config_opts, store_opts], help="acquire and write one part")
    part.add_argument("--part", type=int, required=True)
    part.add_argument("--staging", type=Path, default=None,
                      help="the locality groups' staged samples: with build.sites_per_group > 0 the part packs "
                           "them instead of reading its sites")
    part.set_defaults(func=cmd_build_part)
    group = build_cmds.add_parser("group", parents=[config_opts],
                                  help="acquire and stage one locality group (build.sites_per_group > 0)")
    group.add_argument("--manifest", type=Path, required=True, help="manifest.parquet")
    group.add_argument("--staging", type=Path, required=True, help="folder of the staged samples")
    group.add_argument("--group", type=int, required=True)
    group.set_defaults(func=cmd_build_group)
    final = build_cmds.add_parser("finalize", parents=[config_opts, store_opts],
                                  help="check completeness, normalisation statistics, consolidate")
    final.add_argument("parts", type=Path, nargs="+", help="the parts' JSON records")
    final.set_defaults(func=cmd_build_finalize)
    verify = build_cmds.add_parser("verify", parents=[store_opts],
                                   help="check a store against its manifest and its recorded shard checksums")
    verify.set_defaults(func=cmd_build_verify)
    publish = build_cmds.add_parser("publish", parents=[config_opts],
                                    help="dataset card, STAC collection and Croissant metadata of a built store")
    publish.add_argument("--manifest", type=Path, required=True, help="manifest.parquet")
    publish.add_argument("--store", type=Path, required=True, help="the Zarr store (a folder)")
    publish.add_argument("--out-dir", type=Path, required=True,
                         help="folder of DATASET.md, stac/, croissant.json, samples.csv (beside the store)")
    publish.set_defaults(func=cmd_build_publish)
    figures = build_cmds.add_parser("figures", help="report figures of the store (PNG)")
    figures.add_argument("--store", type=Path, required=True)
    figures.add_argument("--summary", type=Path, required=True, help="summary.json of finalize")
    figures.add_argument("--samples-out", type=Path, required=True)
    figures.add_argument("--shifts-out", type=Path, required=True)
    figures.set_defaults(func=cmd_build_figures)

    pretrain_cmds = groups.add_parser("pretrain", help="X-STARS pretraining on the store").add_subparsers(
        dest="command", required=True
    )
    run = pretrain_cmds.add_parser("run", parents=[config_opts], help="train one run of pretrain.runs")
    run.add_argument("--store", type=Path, required=True, help="the Zarr store (a folder)")
    run.add_argument("--run", required=True, help="name of the run in pretrain.runs")
    run.add_argument("--out-dir", type=Path, required=True, help="checkpoint, metrics and exported backbone go here")
    run.add_argument("--nproc", type=int, default=1,
                     help="processes (one per GPU; gloo on CPU): >1 starts torchrun (default: %(default)s)")
    run.add_argument("--init", type=Path, help="source weights of a continual run (default: continual.checkpoint)")
    run.add_argument("--max-steps", type=int, help="stop after this many steps (a checkpoint is written)")
    run.set_defaults(func=cmd_pretrain_run)
    losses = pretrain_cmds.add_parser("figure", help="loss curves of runs (PNG)")
    losses.add_argument("--out", type=Path, required=True)
    losses.add_argument("metrics", type=Path, nargs="+", help="metrics.jsonl of each run (in its run folder)")
    losses.set_defaults(func=cmd_pretrain_figure)

    evaluate_cmds = groups.add_parser("evaluate", help="downstream tasks on frozen features").add_subparsers(
        dest="command", required=True
    )
    model = evaluate_cmds.add_parser("model", parents=[config_opts], help="every task for one model (JSON)")
    model.add_argument("--store", type=Path, required=True, help="the Zarr store (a folder)")
    model.add_argument("--model", required=True, help="a run of pretrain.runs, or `random`")
    model.add_argument("--runs-dir", type=Path, required=True, help="folder of the runs (<run>/backbone.safetensors)")
    model.add_argument("--out", type=Path, required=True)
    model.set_defaults(func=cmd_evaluate_model)
    report = evaluate_cmds.add_parser("report", help="tables and figures from the models' results")
    report.add_argument("--store", type=Path, required=True)
    report.add_argument("--out-dir", type=Path, required=True)
    report.add_argument("--seeds", default="", help="probe seeds, listed in the table's notes (comma-separated)")
    report.add_argument("results", type=Path, nargs="+", help="the models' JSON results")
    report.set_defaults(func=cmd_evaluate_report)

    import_cmds = groups.add_parser("import", help="datasets in other layouts -> a store").add_subparsers(
        dest="command", required=True)
    msc_in = import_cmds.add_parser("msc-france", parents=[config_opts],
                                    help="the released MSC-France folder (<Sensor>/<City>/<tile> images) -> a store")
    msc_in.add_argument("source", type=Path, help="folder of the released dataset (holds SPOT/, Sentinel/, ...)")
    msc_in.add_argument("--out", type=Path, help="the store to write (default: <results_dir>/msc_france/dataset.zarr)")
    msc_in.set_defaults(func=cmd_import_msc_france)
    export_cmds = groups.add_parser("export", help="a store -> other layouts").add_subparsers(
        dest="command", required=True)
    msc_out = export_cmds.add_parser("msc-france", parents=[config_opts],
                                     help="a store -> the released MSC-France layout (8-bit RGB per sensor and city)")
    msc_out.add_argument("store", type=Path, help="the Zarr store (a folder)")
    msc_out.add_argument("out", type=Path, help="folder to write <Sensor>/<City>/<tile> images, tiles.csv, README.md")
    msc_out.set_defaults(func=cmd_export_msc_france)

    check = demo_cmds.add_parser("check-coregistration", parents=[root_opt],
                                 help="co-registration residuals against the demo world's known shifts")
    check.add_argument("--out", type=Path, required=True, help="JSON figures")
    check.add_argument("parts", type=Path, nargs="+", help="the build parts' JSON records")
    check.set_defaults(func=cmd_demo_check_coregistration)
    return parser


def _config_options() -> argparse.ArgumentParser:
    """Options shared by every command that reads the configuration."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--config", type=Path, help="config file (default: ./config.yaml)")
    opts.add_argument("--world", help="world overlay to apply (default: the file's `world`)")
    opts.add_argument(
        "--config-json",
        metavar="JSON",
        help="the resolved config (or some of its sections) as JSON, instead of --config/--world/--set",
    )
    opts.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value, e.g. --set stac.max_retries=3 (VALUE is YAML; repeatable)",
    )
    return opts


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config named by --config, with --world and every --set applied last.

    With --config-json, that JSON is the config: it must hold every section the command reads
    (``args.sections``); defaults are filled for absent keys inside them.
    """
    if getattr(args, "config_json", None) is not None:
        if args.config is not None or args.world is not None or args.overrides:
            raise ConfigError("--config-json replaces --config/--world/--set: give one or the other")
        try:
            given = json.loads(args.config_json)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config-json is not valid JSON: {err}") from None
        if not isinstance(given, dict):
            raise ConfigError("--config-json must be a JSON object of config sections")
        needed = getattr(args, "sections", None) or ()
        missing = [section for section in needed if section not in given]
        if missing:
            raise ConfigError(f"--config-json lacks the section(s) {', '.join(missing)} that "
                              f"`xstars {args.group} {args.command}` reads (it reads {', '.join(needed)})")
        # Already resolved (world overlay applied): only validated here, defaults filled.
        return expand_demo_address(validate(given, sections=list(given)))
    overrides: dict[str, Any] = {}
    for assignment in args.overrides:
        overrides = deep_merge(overrides, parse_override(assignment))
    if args.world is not None:
        overrides["world"] = args.world
    return load_config(args.config, overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved config, defaults included, in a form `--config` accepts back."""
    config = config_from_args(args)
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return 0


def cmd_demo_generate(args: argparse.Namespace) -> int:
    """Generate the demo world under --root (default: demo.root)."""
    if args.demo_json is not None:
        if args.config is not None or args.world is not None or args.overrides:
            raise ConfigError("--demo-json replaces --config/--world/--set: give one or the other")
        demo = _demo_from_json(args.demo_json)
    else:
        demo = config_from_args(args)["demo"]
    root = args.root or Path(demo["root"])
    demo["root"] = str(root)
    # Imported once the config is known to be valid: the generator pulls in the raster stack.
    from xstars.demo.generate import generate_world
    from xstars.demo.layout import world_json

    log.info("demo generate root=%s seed=%d cities=%s", root, demo["seed"], _names(demo))
    generate_world(root, demo)
    log.info("demo generated world_json=%s", world_json(root))
    return 0


def cmd_demo_up(args: argparse.Namespace) -> int:
    """Start the demo servers (or reuse the running ones) and print their URLs as key=value."""
    from xstars.demo.control import ensure_up

    demo = config_from_args(args)["demo"]
    root = args.root or Path(demo["root"])
    info = ensure_up(root, demo["host"], demo["port"], demo["stac_backend_port"], token_ttl_s=demo["token_ttl_s"])
    log.info("demo up root=%s pid=%s", root, info.pid)
    for key in ("stac_url", "files_url", "wms_url", "token_url", "proxy", "pid"):
        print(f"{key}={getattr(info, key)}")
    return 0


def cmd_demo_down(args: argparse.Namespace) -> int:
    """Stop the demo servers started for --root; not running is not an error."""
    from xstars.demo.control import stop

    root = args.root or Path(config_from_args(args)["demo"]["root"])
    stopped = stop(root)
    log.info("demo down root=%s stopped=%s", root, stopped)
    print("stopped" if stopped else "not running")
    return 0


def cmd_demo_status(args: argparse.Namespace) -> int:
    """Whether the servers recorded for --root answer their health check (exit 0 up, 1 down)."""
    from xstars.demo.control import health, read_server_json

    root = args.root or Path(config_from_args(args)["demo"]["root"])
    info = read_server_json(root)
    if info is None or health(info.base_url) is None:
        print(f"down root={root}")
        return 1
    print(f"up root={root} pid={info.pid} stac_url={info.stac_url} wms_url={info.wms_url}")
    return 0


def cmd_demo_preview(args: argparse.Namespace) -> int:
    """Render the overview PNG of a generated world."""
    from xstars.demo.generate import render_preview

    args.out.parent.mkdir(parents=True, exist_ok=True)
    render_preview(args.root, args.out)
    log.info("demo preview root=%s out=%s", args.root, args.out)
    return 0


def serve_demo_if_needed(config: dict[str, Any]) -> None:
    """In the demo world, make sure its servers run (started, or reused if already up)."""
    if config["world"] != "demo":
        return
    from xstars.demo.control import ensure_up

    demo = config["demo"]
    info = ensure_up(Path(demo["root"]), demo["host"], demo["port"], demo["stac_backend_port"],
                     token_ttl_s=demo["token_ttl_s"])
    log.info("demo servers root=%s url=%s", demo["root"], info.base_url)


def cmd_catalog_sites(args: argparse.Namespace) -> int:
    """Draw the sites of the config and write them as GeoParquet."""
    from xstars.sites import sample_sites, write_sites

    config = config_from_args(args)
    sites = sample_sites(config)
    write_sites(sites, args.out, config["sites"]["crs"])
    log.info("catalog sites n=%d out=%s", len(sites), args.out)
    return 0


def cmd_catalog_search(args: argparse.Namespace) -> int:
    """Search one shard of the sites' groups; write its candidate scenes, their items and the
    rows it chooses for its sites."""
    from xstars.catalog import search_shard
    from xstars.sites import read_sites

    config = config_from_args(args)
    sites = read_sites(args.sites)
    serve_demo_if_needed(config)
    out = search_shard(config, sites, args.shard, args.out)
    log.info("catalog search shard=%d searches=%d candidates=%d items=%s out=%s", args.shard, len(out.searches),
             out.candidates, json.dumps(out.items, sort_keys=True), args.out)
    return 0


def cmd_catalog_manifest(args: argparse.Namespace) -> int:
    """Put every shard's rows (a scene per site and sensor) in order as the manifest, with its items."""
    from xstars.catalog import merge_manifest
    from xstars.sites import read_sites

    counts = merge_manifest(config_from_args(args), read_sites(args.sites), args.candidates, args.out,
                            merged_items=args.items)
    _write_summary(counts, args.summary)
    return 0


def cmd_catalog_items(args: argparse.Namespace) -> int:
    """Merge the items one sensor's rows name from every shard's items file, once each."""
    from xstars.catalog import merge_sensor_items

    pin = merge_sensor_items(config_from_args(args), args.sensor, args.candidates, args.out)
    log.info("catalog items sensor=%s items=%d out=%s", args.sensor, pin["items"] if pin else 0, args.out)
    return 0


def cmd_catalog_freeze(args: argparse.Namespace) -> int:
    """Frozen mode: check the manifest named by catalog.manifest and its pinned items files and
    copy them, byte for byte."""
    from xstars.manifest import Manifest
    from xstars.selection import manifest_summary

    config = config_from_args(args)
    source = config["catalog"]["manifest"]
    if not source:
        raise ConfigError("catalog.manifest: empty; frozen mode needs the path of an existing manifest")
    manifest = Manifest(Path(source))
    manifest.check_items()
    manifest.copy_to(args.out)
    _write_summary(manifest_summary(manifest), args.summary)
    return 0


def cmd_catalog_convert(args: argparse.Namespace) -> int:
    """Write a layout-1 manifest (item JSON in every row) in this layout."""
    from xstars.manifest import Manifest, convert_manifest

    config = config_from_args(args)
    out = convert_manifest(args.manifest, args.out, config["build"]["samples_per_shard"])
    manifest = Manifest(out)
    log.info("catalog convert %s -> %s: %d sites, items %s", args.manifest, out, manifest.n_sites,
             json.dumps({s: p["items"] for s, p in manifest.layout["items"].items()}, sort_keys=True))
    return 0


def cmd_catalog_wms_layers(args: argparse.Namespace) -> int:
    """Print, per ``wms_layers`` sensor, each configured layer and year and whether the service
    serves it; exit 2 with the catalog stage's own error when something is missing."""
    from xstars.remote import WmsClient, describe_wms_sensor, wms_layer_problems
    from xstars.sensors import sensors_of

    config = config_from_args(args)
    serve_demo_if_needed(config)
    problems = []
    for sensor in sensors_of(config).values():
        if sensor.kind != "wms_layers":
            continue
        caps = WmsClient(sensor.catalog_cfg, config["http"]).capabilities()
        print("\n".join(describe_wms_sensor(sensor, caps)))
        problems += wms_layer_problems(sensor, caps)
    if problems:
        raise ConfigError("; ".join(problems))
    return 0


def cmd_catalog_plot(args: argparse.Namespace) -> int:
    """Draw the manifest's sites and chosen scenes."""
    from xstars.figures import plot_manifest

    plot_manifest(args.manifest, args.out)
    log.info("catalog plot out=%s", args.out)
    return 0


def cmd_build_init(args: argparse.Namespace) -> int:
    """Create the store for the manifest's sites; write the number of samples and parts.

    The workflow planned its build jobs from the config (:func:`xstars.store.planned_sites`):
    a manifest with another number of sites stops here, before anything is written."""
    from xstars.errors import DataError
    from xstars.manifest import Manifest
    from xstars.store import init_store, n_parts, planned_sites

    config = config_from_args(args)
    manifest = Manifest(args.manifest)
    planned, found = planned_sites(config), manifest.n_sites
    if found != planned:
        raise DataError(f"{args.manifest}: {found} sites, but the config plans {planned} (sites.cities x "
                        "sites.sites_per_city + sites.uniform_count, or the frozen catalog.manifest's sites): "
                        "the manifest was made with another config")
    samples = init_store(args.store, manifest, config)
    parts = n_parts(samples, config["build"]["samples_per_shard"])
    _write_json(args.out, {"store": str(args.store), "samples": samples, "parts": parts})
    log.info("build init store=%s samples=%d parts=%d", args.store, samples, parts)
    return 0


def cmd_build_part(args: argparse.Namespace) -> int:
    """Acquire, co-register and write one part of the store."""
    from xstars.manifest import Manifest
    from xstars.store import build_part, write_part_record

    config = config_from_args(args)
    # The groups read, the part packs; without the staging folder it reads its own sites (the
    # same store either way).
    staging = args.staging if int(config["build"]["sites_per_group"]) > 0 else None
    if staging is None:
        serve_demo_if_needed(config)
    record = build_part(args.store, Manifest(args.manifest), config, args.part, staging)
    write_part_record(record, args.out)
    return 0


def cmd_build_group(args: argparse.Namespace) -> int:
    """Acquire, co-register and stage the sites of one locality group."""
    from xstars.manifest import Manifest
    from xstars.store import build_group

    config = config_from_args(args)
    if int(config["build"]["sites_per_group"]) < 1:
        raise ConfigError("build.sites_per_group is 0: the parts read their own sites, there is no group to build")
    serve_demo_if_needed(config)
    build_group(args.staging, Manifest(args.manifest), config, args.group)
    return 0


def cmd_build_finalize(args: argparse.Namespace) -> int:
    """Check that every site is stored or dropped with its reason; statistics; consolidate."""
    from xstars.manifest import Manifest
    from xstars.store import finalize

    config = config_from_args(args)
    records = [json.loads(path.read_text()) for path in args.parts]
    summary = finalize(args.store, Manifest(args.manifest), records, config)
    _write_json(args.out, summary)
    log.info("build finalize %s", json.dumps({k: v for k, v in summary.items() if k != "normalization"}))
    return 0


def cmd_build_verify(args: argparse.Namespace) -> int:
    """Write the verification report; exit 2 naming the problems when the store is not whole."""
    from xstars.errors import DataError
    from xstars.layout import open_store
    from xstars.manifest import Manifest
    from xstars.verify import verify_store

    open_store(args.store)  # a path that is not a store is named before the manifest is read
    report = verify_store(args.store, Manifest(args.manifest))
    _write_json(args.out, report)
    if not report["ok"]:
        raise DataError(f"{args.store} does not verify:\n  " + "\n  ".join(report["problems"]))
    log.info("build verify %s: %d sites, %d shards checked", args.store, report["sites"], report["shards_checked"])
    return 0


def cmd_build_publish(args: argparse.Namespace) -> int:
    """Write the dataset card, build config, sample table, STAC (validated offline) and Croissant."""
    from xstars.publish import publish

    written = publish(args.store, args.manifest, config_from_args(args), args.out_dir)
    log.info("build publish %s", json.dumps(written, sort_keys=True))
    return 0


def cmd_build_figures(args: argparse.Namespace) -> int:
    """Draw a few stored sites (three sensors and labels) and the co-registration histogram."""
    from xstars.figures import plot_samples, plot_shifts

    plot_samples(args.store, args.samples_out)
    plot_shifts(args.store, json.loads(args.summary.read_text()), args.shifts_out)
    return 0


def cmd_pretrain_run(args: argparse.Namespace) -> int:
    """Train one run; with ``--nproc N`` > 1, start N processes through torchrun (DDP)."""
    import subprocess

    from xstars.config import run_settings
    from xstars.layout import open_store

    config = config_from_args(args)
    settings = run_settings(config, args.run)
    if args.init is not None and settings["mode"] != "continual":
        raise ConfigError(f"--init {args.init}: run {args.run!r} is not continual (pretrain.runs.{args.run}.mode is "
                          f"{settings['mode']!r}): --init gives the source weights of a continual run")
    open_store(args.store)  # a bad --store ends here in one line, before any process is started
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if 0 < visible < args.nproc:  # on CPU (no GPU at all), the processes share the cores (gloo)
            raise ConfigError(f"--nproc {args.nproc}: only {visible} GPU(s) visible to this job "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                              "pretrain.resources.gpus_per_node must match what the scheduler gives")
        # torchrun runs this same command in every process; WORLD_SIZE tells them apart.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "xstars"]
        log.info("pretrain %s: starting %d processes with torchrun", args.run, args.nproc)
        env = {**os.environ, TORCHRUN_ARGV: json.dumps(args.argv)}
        return subprocess.run(command, env=env, check=False).returncode
    from xstars.model import BACKBONE
    from xstars.train import pretrain

    init = args.init
    if init is None and settings["mode"] == "continual" and settings["continual"]["from_run"]:
        init = args.out_dir.parent / settings["continual"]["from_run"] / BACKBONE  # a sibling run's export
    summary = pretrain(args.store, settings, args.out_dir, seed=config["seed"], init_checkpoint=init,
                       max_steps=args.max_steps, progress=sys.stderr.isatty())
    log.info("pretrain %s %s", args.run, json.dumps(summary, sort_keys=True))
    return 0


def cmd_pretrain_figure(args: argparse.Namespace) -> int:
    from xstars.figures import plot_losses

    plot_losses({path.parent.name: path for path in args.metrics}, args.out)
    return 0


def cmd_evaluate_model(args: argparse.Namespace) -> int:
    """Embed the store with one model and run every probe; write its records."""
    import torch

    from xstars.evaluate import evaluate_model, random_model, save
    from xstars.model import BACKBONE, load_exported

    config = config_from_args(args)
    settings = config["evaluate"]
    if args.model == "random":
        backbone, description = random_model(args.store, config["pretrain"], settings["sensors"], config["seed"])
    else:
        backbone, description = load_exported(args.runs_dir / args.model / BACKBONE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_model(backbone, description, args.store, settings, args.model, device)
    save(result, args.out)
    log.info("evaluate %s: %d records", args.model, len(result["records"]))
    return 0


def cmd_evaluate_report(args: argparse.Namespace) -> int:
    """The results table (CSV + Markdown), label-efficiency curves and retrieval examples."""
    from xstars.evaluate import write_tables
    from xstars.figures import plot_label_efficiency, plot_retrieval_examples

    results = [json.loads(path.read_text()) for path in args.results]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    write_tables(results, args.out_dir / "results.csv", args.out_dir / "results.md", seeds)
    plot_label_efficiency(results, args.out_dir / "label_efficiency.png")
    plot_retrieval_examples(results, args.store, args.out_dir / "retrieval_examples.png")
    print((args.out_dir / "results.md").read_text())
    return 0


def cmd_demo_benchmarks(args: argparse.Namespace) -> int:
    """Fake EuroSAT, BigEarthNet, FLAIR and generic copies, for the demo's evaluation and tests."""
    from xstars.demo.benchmarks import WRITERS, write_benchmarks

    layouts = [name for name in args.layouts.split(",") if name]
    unknown = [name for name in layouts if name not in WRITERS]
    if unknown:
        raise ConfigError(f"--layouts: {unknown} are not layouts ({', '.join(WRITERS)})")
    paths = write_benchmarks(args.out, args.seed, layouts or None)
    log.info("demo benchmarks %s", json.dumps(paths, sort_keys=True))
    return 0


def cmd_import_msc_france(args: argparse.Namespace) -> int:
    """The released MSC-France folder -> a store that pretraining and evaluation read."""
    from xstars.msc_france import import_folder

    config = config_from_args(args)
    out = args.out or Path(config["results_dir"]) / "msc_france" / "dataset.zarr"
    summary = import_folder(args.source, out, config["msc_france"])
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def cmd_export_msc_france(args: argparse.Namespace) -> int:
    """A store -> the released MSC-France layout."""
    from xstars.msc_france import export_store

    summary = export_store(args.store, args.out, config_from_args(args)["msc_france"])
    print(json.dumps({k: v for k, v in summary.items() if k != "folders"} |
                     {"folders": {f: v["sensor"] for f, v in summary["folders"].items()}}, sort_keys=True))
    return 0


def cmd_demo_check_coregistration(args: argparse.Namespace) -> int:
    """Residual shifts after co-registration, against the demo world's truth/shifts.json."""
    from xstars.demo.check import coregistration_residuals

    figures = coregistration_residuals(args.root, [json.loads(p.read_text()) for p in args.parts])
    _write_json(args.out, figures)
    log.info("demo coregistration %s", json.dumps(figures, sort_keys=True))
    return 0


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _write_summary(counts: dict[str, Any], path: Path | None) -> None:
    log.info("catalog manifest %s", json.dumps(counts, sort_keys=True))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")


def _demo_from_json(text: str) -> dict[str, Any]:
    """The `demo` section from JSON, validated (and defaults filled) like the whole config."""
    try:
        demo = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--demo-json is not valid JSON: {err}") from None
    return validate({"demo": demo}, sections=["demo"])["demo"]


def _names(demo: dict[str, Any]) -> str:
    return ",".join(city["name"] for city in demo["cities"])


if __name__ == "__main__":
    sys.exit(main())
