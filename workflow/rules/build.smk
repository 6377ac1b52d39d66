"""Build stage: manifest -> sharded Zarr store (xstars/acquire.py, coregister.py, store.py).

`store_init` creates the arrays; one `build_part` job per part (a shard of samples, i.e. of
sites: their number is known from the config, so the whole DAG is planned at parse time) reads,
co-registers and writes its shard of every array (with `build.sites_per_group > 0`, one
`build_group` job per locality group reads and co-registers instead, and the parts pack);
`dataset` checks completeness, adds the normalisation statistics and consolidates the metadata;
`publish_dataset` writes the dataset card, the STAC collection and the Croissant metadata
beside the store.
"""

rule store_init:
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
    output:
        DATASET / "init.json",
    params:
        cfg=config_json("build init"),
        store=STORE,
    log:
        "logs/build/store_init.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build init --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --out {output} > {log} 2>&1"


rule build_group:
    wildcard_constraints:
        group=r"\d+",
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
        item_files=RESULTS / "catalog" / "manifest.items",  # the group reads the items its rows name
        world=demo_world_input,
    output:
        # Temporary: removed once every part has packed its samples (the store's raw size again).
        temp(directory(STAGING / "group-{group}")),
    params:
        cfg=config_json("build group"),
        staging=STAGING,
    resources:
        **WMS_RESOURCES,  # at most catalogs.<wms>.max_concurrent_jobs jobs query a WMS at once
    log:
        "logs/build/build_group-{group}.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build group --config-json {params.cfg:q} --manifest {input.manifest}"
        " --staging {params.staging} --group {wildcards.group} > {log} 2>&1"


rule build_part:
    wildcard_constraints:
        part=r"\d+",
    input:
        init=DATASET / "init.json",
        manifest=RESULTS / "catalog" / "manifest.parquet",
        item_files=RESULTS / "catalog" / "manifest.items",  # the part reads the items its rows name
        world=demo_world_input,
        staged=build_groups,  # with build.sites_per_group > 0: the part packs, the groups read
    output:
        DATASET / "parts" / "part-{part}.json",
    params:
        cfg=config_json("build part"),
        store=STORE,
        staging=STAGING,
    resources:
        # At most catalogs.<wms>.max_concurrent_jobs jobs query a WMS at once; a part that
        # packs staged samples queries none.
        **({} if BUILD_GROUPS else WMS_RESOURCES),
    log:
        "logs/build/build_part-{part}.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build part --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --part {wildcards.part} --staging {params.staging} --out {output} > {log} 2>&1"


rule dataset:
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
        parts=build_parts,
    output:
        DATASET / "summary.json",
    params:
        cfg=config_json("build finalize"),
        store=STORE,
    log:
        "logs/build/dataset.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build finalize --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --out {output} {input.parts} > {log} 2>&1"


rule dataset_figures:
    input:
        summary=DATASET / "summary.json",
    output:
        samples=report(DATASET / "samples.png", caption="../report/dataset_samples.rst", category="Dataset"),
        shifts=report(DATASET / "shifts.png", caption="../report/dataset_shifts.rst", category="Dataset"),
    params:
        store=STORE,
    log:
        "logs/build/dataset_figures.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build figures --store {params.store} --summary {input.summary}"
        " --samples-out {output.samples} --shifts-out {output.shifts} > {log} 2>&1"


rule coregistration_vs_truth:
    input:
        world=DEMO_ROOT / "world.json",
        parts=build_parts,
    output:
        report(
            DATASET / "coregistration_vs_truth.json",
            caption="../report/coregistration_vs_truth.rst",
            category="Dataset",
        ),
    params:
        root=DEMO_ROOT,
    log:
        "logs/build/coregistration_vs_truth.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars demo check-coregistration --root {params.root} --out {output} {input.parts} > {log} 2>&1"


rule verify_dataset:
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
        summary=DATASET / "summary.json",
    output:
        DATASET / "verify.json",
    params:
        store=STORE,
    log:
        "logs/build/verify_dataset.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build verify --manifest {input.manifest} --store {params.store} --out {output} > {log} 2>&1"


rule publish_dataset:
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
        summary=DATASET / "summary.json",
    output:
        card=DATASET / "DATASET.md",
        stac=DATASET / "stac" / "collection.json",
        croissant=DATASET / "croissant.json",
        samples=DATASET / "samples.csv",
        build_config=DATASET / "build_config.yaml",
    params:
        # What the build read (its hash goes into the card) and how to present it.
        cfg=config_json("build publish"),
        store=STORE,
        out_dir=output_folder,
    log:
        "logs/build/publish_dataset.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build publish --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --out-dir {params.out_dir} > {log} 2>&1"
