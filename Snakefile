# xstars: rebuild the MSC-France multi-sensor dataset (Sentinel-2, Landsat-8, IGN aerial
# orthophotos, WorldCover labels) from public catalogues and pretrain ViTs with X-STARS.
#
# This file is the table of contents. Rules live in workflow/rules/*.smk and only call the
# `xstars` command line: the logic is in the Python package, where it is unit-tested.
# workflow/README.md explains the layout and why this file sits at the repository root.
#
#   snakemake --cores 2 all --config world=demo   # offline demo world (targets BEFORE --config:
#                                                 # --config takes every word after it)
#   snakemake --cores 8 all                       # the real build, config.yaml as it is
#   snakemake --lint; snakemake -n all; snakemake --report report.html
#
# Every config key is documented in workflow/schemas/config.schema.yaml; values given with
# --config KEY=VALUE win over the selected world's overlay.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# Validates the config, applies the world overlay, defines RESULTS, DEMO_ROOT and helpers.
include: "workflow/rules/common.smk"
# Stages, in data-flow order.
include: "workflow/rules/demo.smk"
include: "workflow/rules/catalog.smk"
include: "workflow/rules/build.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"


localrules:
    all,
    build_dataset,
    pretrain,
    evaluate,


rule pretrain:
    input:
        expand(PRETRAIN / "{run}" / "backbone.safetensors", run=PRETRAIN_RUNS),
        PRETRAIN / "losses.png",


rule evaluate:
    input:
        EVALUATE / "results.md",
        EVALUATE / "label_efficiency.png",
        EVALUATE / "retrieval_examples.png",


rule all:
    default_target: True
    input:
        get_final_output(),


rule build_dataset:
    input:
        RESULTS / "catalog" / "catalog.png",
        RESULTS / "dataset" / "samples.png",
        RESULTS / "dataset" / "verify.json",
        RESULTS / "dataset" / "DATASET.md",


# The demo world's servers are started by the first rule that needs them (xstars catalog
# search, ...); they are stopped at the end unless they were already running before this run.
_DEMO_SERVERS = {"were_up": False}


onstart:
    if IS_DEMO:
        _DEMO_SERVERS["were_up"] = demo_servers_up()


onsuccess:
    if IS_DEMO and not _DEMO_SERVERS["were_up"]:
        stop_demo_servers()


onerror:
    if IS_DEMO and not _DEMO_SERVERS["were_up"]:
        stop_demo_servers()
