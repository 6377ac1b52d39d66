"""Parse-time setup shared by the rule files (the validated config, small helpers); no rules."""

import json
from pathlib import Path

from xstars.config import resolve_config, retype_snakemake_overrides

# Snakemake has already merged --config/--configfile into `config`. Resolving the world overlay
# applies them once more after it, so that a command-line value beats the overlay; the result
# is validated against the schema (defaults filled, unknown keys rejected) before any rule is
# defined. `config` is updated in place because it is also the workflow's own object.
_overrides = retype_snakemake_overrides(workflow.config_settings.overwrite_config)
_resolved = resolve_config(config, overrides=_overrides)
config.clear()
config.update(_resolved)

# A WMS allows catalogs.<name>.max_requests_per_s for all our jobs together: at most
# max_concurrent_jobs jobs query it at once (each paces itself at its share), locally or on any
# number of SLURM nodes. From the config, not --resources: the pace and the cap must agree.
# One resource per WMS a sensor is read from; the jobs that query the services take 1 of each.
WMS_RESOURCES = {}
for _name in sorted({sensor["catalog"] for sensor in config["sensors"].values()}):
    if config["catalogs"][_name]["kind"] == "wms":
        workflow.register_resource(f"wms_jobs_{_name}", config["catalogs"][_name]["max_concurrent_jobs"])
        WMS_RESOURCES[f"wms_jobs_{_name}"] = 1

RESULTS = Path(config["results_dir"])
DEMO_ROOT = Path(config["demo"]["root"])
# The demo section as the generator reads it: a rule parameter, so that changing any demo
# setting (even with --config) reruns the generator.
DEMO_JSON = json.dumps(config["demo"], sort_keys=True)
# Fake copies of the public benchmarks (rule demo_benchmarks), for evaluate.benchmarks that point there.
DEMO_BENCHMARKS = DEMO_ROOT / "benchmarks"


IS_DEMO = config["world"] == "demo"
DATASET = RESULTS / "dataset"
STORE = DATASET / "dataset.zarr"


def get_final_output():
    """Targets of `rule all`; each stage adds its own here."""
    demo = [DEMO_ROOT / "world.json", RESULTS / "preview.png", DATASET / "coregistration_vs_truth.json"]
    pretrain = [PRETRAIN / run / "backbone.safetensors" for run in PRETRAIN_RUNS] + [PRETRAIN / "losses.png"]
    evaluate = [EVALUATE / "results.md", EVALUATE / "label_efficiency.png", EVALUATE / "retrieval_examples.png"]
    return [
        *(demo if IS_DEMO else []),
        RESULTS / "catalog" / "catalog.png",
        DATASET / "samples.png",
        DATASET / "verify.json",
        DATASET / "DATASET.md",
        *pretrain,
        *evaluate,
    ]


def config_json(command):
    """The config sections `xstars <command>` reads (xstars.cli.SECTIONS) as JSON, for `params`.

    A rule passes it to `xstars ... --config-json`; being a parameter, a change to any of these
    sections (even with --config) reruns the rule, and to no other section does. Returned as a
    function so that Snakemake does not read the braces of the JSON (`{year}`) as wildcards.
    Keys keep the config's order: the order of `sensors` is the dataset's.
    """
    from xstars.cli import SECTIONS

    text = json.dumps({key: config[key] for key in SECTIONS[command]})
    return lambda wildcards: text


def demo_world_input(wildcards):
    """In the demo world, rules that talk to its servers need the world generated first."""
    return [DEMO_ROOT / "world.json"] if IS_DEMO else []


def input_folder(wildcards, input):
    """Folder of a rule's first input, e.g. a world's root from its world.json.

    Derived from the path rather than repeated as a string, so the folder is written once.
    """
    return str(Path(input[0]).parent)


def output_folder(wildcards, output):
    """Folder of a rule's first output (see input_folder)."""
    return str(Path(output[0]).parent)


def demo_servers_up():
    """Whether the demo world's servers answer (on the configured address)."""
    from xstars.demo.control import health

    return health(f"http://{config['demo']['host']}:{config['demo']['port']}") is not None


def stop_demo_servers():
    """Stop the demo servers of DEMO_ROOT (nothing to do when none runs)."""
    from xstars.demo.control import stop

    stop(DEMO_ROOT)


def _planned_parts():
    """Build jobs, known at parse time: the sites of the config (or of the frozen manifest),
    ``build.samples_per_shard`` per job. `xstars build init` stops if the manifest disagrees."""
    from xstars.store import n_parts, planned_sites

    return n_parts(planned_sites(config), config["build"]["samples_per_shard"])


BUILD_PARTS = _planned_parts()
# build.sites_per_group > 0: the reads are planned by locality (xstars/staging.py), one
# build_group job per group of sites, then the parts pack the staged samples.
_SITES_PER_GROUP = int(config["build"]["sites_per_group"])
STAGING = DATASET / "staging"


def _planned_groups():
    from xstars.staging import n_groups
    from xstars.store import planned_sites

    return n_groups(planned_sites(config), _SITES_PER_GROUP) if _SITES_PER_GROUP else 0


BUILD_GROUPS = _planned_groups()


def build_groups(wildcards):
    """Every locality group's staged samples (none when the parts read their own sites)."""
    return [STAGING / f"group-{group}" for group in range(BUILD_GROUPS)]


def build_parts(wildcards):
    """Every build part's record."""
    return [DATASET / "parts" / f"part-{part}.json" for part in range(BUILD_PARTS)]


# ------------------------------------------------------------------------------ pretrain

PRETRAIN = RESULTS / "pretrain"
PRETRAIN_RUNS = list(config["pretrain"]["runs"])
_resources = config["pretrain"]["resources"]
PRETRAIN_GPUS = _resources["gpus_per_node"]
PRETRAIN_CPUS = _resources["cpus_per_gpu"] * max(PRETRAIN_GPUS, 1)
PRETRAIN_MEM_MB = _resources["mem_mb_per_gpu"] * max(PRETRAIN_GPUS, 1)


wildcard_constraints:
    run="|".join(PRETRAIN_RUNS) or "(?!)",


def pretrain_settings(run):
    from xstars.config import run_settings

    return run_settings(config, run)


def pretrain_source_input(wildcards):
    """A continual run starts from another run's exported backbone: that run comes first."""
    settings = pretrain_settings(wildcards.run)
    continual = settings["continual"]
    if settings["mode"] == "continual" and continual["from_run"]:
        return [PRETRAIN / continual["from_run"] / "backbone.safetensors"]
    return []


def pretrain_run_json(wildcards):
    """The config a run needs, as JSON: the shared pretrain values and this run's overlay (and
    its source run's), so that editing another run does not retrain this one."""
    pretrain = {k: v for k, v in config["pretrain"].items() if k not in ("runs", "resources")}
    runs = {wildcards.run: config["pretrain"]["runs"][wildcards.run]}
    source = pretrain_settings(wildcards.run)["continual"]["from_run"]
    if source:
        runs[source] = config["pretrain"]["runs"][source]
    return json.dumps({"seed": config["seed"], "pretrain": pretrain | {"runs": runs}},
                      sort_keys=True)


# ------------------------------------------------------------------------------ evaluate

EVALUATE = RESULTS / "evaluate"
EVALUATE_MODELS = (config["evaluate"]["models"] or PRETRAIN_RUNS) + (
    ["random"] if config["evaluate"]["include_random"] else []
)


wildcard_constraints:
    model="|".join(EVALUATE_MODELS) or "(?!)",


def evaluate_backbone_input(wildcards):
    """A pretrained model is evaluated once its run has exported it; `random` needs nothing."""
    return [] if wildcards.model == "random" else [PRETRAIN / wildcards.model / "backbone.safetensors"]


def evaluate_benchmarks_input(wildcards):
    """The generated fake benchmark copies, when evaluate.benchmarks reads any of them (the demo
    world's); a user's own copy is not a workflow output."""
    fakes = str(DEMO_BENCHMARKS) + "/"
    if any(spec["path"].startswith(fakes) for spec in config["evaluate"]["benchmarks"]):
        return [DEMO_BENCHMARKS / "benchmarks.json"]
    return []
