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

RESULTS = Path(config["results_dir"])
DEMO_ROOT = Path(config["demo"]["root"])
# The demo section as the generator reads it: a rule parameter, so that changing any demo
# setting (even with --config) reruns the generator.
DEMO_JSON = json.dumps(config["demo"], sort_keys=True)


def get_final_output():
    """Targets of `rule all`; each stage adds its own here."""
    return [
        DEMO_ROOT / "world.json",
        RESULTS / "demo" / "preview.png",
    ]


def input_folder(wildcards, input):
    """Folder of a rule's first input, e.g. a world's root from its world.json.

    Derived from the path rather than repeated as a string, so the folder is written once.
    """
    return str(Path(input[0]).parent)


def output_folder(wildcards, output):
    """Folder of a rule's first output (see input_folder)."""
    return str(Path(output[0]).parent)
