"""Build stage: manifest -> sharded Zarr store (xstars/acquire.py, coregister.py, store.py).

`store_init` creates the arrays and says how many parts (shards of samples) there are; one
`build_part` job per part reads, co-registers and writes its shard of every array; `dataset`
checks completeness, adds the normalisation statistics and consolidates the metadata.
"""

checkpoint store_init:
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
    output:
        DATASET / "init.json",
    params:
        cfg=config_json("sites", "sensors", "build"),
        store=STORE,
    log:
        "logs/build/store_init.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build init --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --out {output} > {log} 2>&1"


rule build_part:
    input:
        init=DATASET / "init.json",
        manifest=RESULTS / "catalog" / "manifest.parquet",
        world=demo_world_input,
    output:
        DATASET / "parts" / "part-{part}.json",
    params:
        cfg=config_json("world", "demo", "stac", "sites", "sensors", "build", "catalog"),
        store=STORE,
    log:
        "logs/build/build_part-{part}.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build part --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --part {wildcards.part} --out {output} > {log} 2>&1"


rule dataset:
    input:
        manifest=RESULTS / "catalog" / "manifest.parquet",
        parts=build_parts,
    output:
        DATASET / "summary.json",
    params:
        cfg=config_json("sites", "sensors", "build", "catalog"),
        store=STORE,
    log:
        "logs/build/dataset.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars build finalize --config-json {params.cfg:q} --manifest {input.manifest}"
        " --store {params.store} --out {output} {input.parts} > {log} 2>&1"
