"""Catalog stage: sites -> STAC search in shards -> manifest (xstars/catalog.py).

Each search shard writes its candidates (Parquet, items named by id), once each the items they
name (`shard-K.items/<sensor>.parquet`, stac-geoparquet), and the rows it chose for its sites
(`shard-K.rows.parquet`: a site's candidates are all in its shard); `manifest_items` merges the
items the rows name, one job per sensor, and `manifest` puts the rows in site order as the
manifest, whose row groups are the build parts, with those items beside it (`manifest.items/`,
checked and copied; xstars/manifest.py).
With `catalog.manifest` set (frozen mode) only `manifest` exists: it checks the given manifest
and the items files it pins by checksum, copies them, and no search is made at all.
"""

CATALOG = RESULTS / "catalog"
N_SHARDS = config["catalog"]["search_shards"]

if config["catalog"]["manifest"]:

    rule manifest:
        input:
            frozen=config["catalog"]["manifest"],
        output:
            manifest=CATALOG / "manifest.parquet",
            item_files=directory(str(CATALOG / "manifest.items")),
            summary=CATALOG / "summary.json",
        params:
            cfg=config_json("catalog freeze"),
        log:
            "logs/catalog/manifest.log",
        conda:
            "../../envs/xstars.yaml"
        shell:
            "xstars catalog freeze --config-json {params.cfg:q} --out {output.manifest}"
            " --summary {output.summary} > {log} 2>&1"

else:

    rule sites:
        output:
            CATALOG / "sites.parquet",
        params:
            # sensors too: a footprint must be a whole number of every sensor's pixels.
            cfg=config_json("catalog sites"),
        log:
            "logs/catalog/sites.log",
        conda:
            "../../envs/xstars.yaml"
        shell:
            "xstars catalog sites --config-json {params.cfg:q} --out {output} > {log} 2>&1"

    rule search_shard:
        input:
            sites=CATALOG / "sites.parquet",
            world=demo_world_input,
        output:
            candidates=CATALOG / "search" / "shard-{shard}.parquet",
            item_files=directory(str(CATALOG / "search" / "shard-{shard}.items")),
            searches=CATALOG / "search" / "shard-{shard}.searches.json",
            rows=CATALOG / "search" / "shard-{shard}.rows.parquet",
        params:
            cfg=config_json("catalog search"),
        resources:
            **WMS_RESOURCES,  # at most catalogs.<wms>.max_concurrent_jobs jobs query a WMS at once
        log:
            "logs/catalog/search_shard-{shard}.log",
        conda:
            "../../envs/xstars.yaml"
        shell:
            "xstars catalog search --config-json {params.cfg:q} --sites {input.sites}"
            " --shard {wildcards.shard} --out {output.candidates} > {log} 2>&1"

    rule manifest_items:
        input:
            # the arguments name the candidates; the job reads the rows and items files beside them
            candidates=expand(CATALOG / "search" / "shard-{shard}.parquet", shard=range(N_SHARDS)),
            item_files=expand(CATALOG / "search" / "shard-{shard}.items", shard=range(N_SHARDS)),
            rows=expand(CATALOG / "search" / "shard-{shard}.rows.parquet", shard=range(N_SHARDS)),
        output:
            CATALOG / "search" / "items" / "{sensor}.parquet",
        wildcard_constraints:
            sensor="|".join(config["sensors"]),
        params:
            cfg=config_json("catalog items"),
        log:
            "logs/catalog/manifest_items-{sensor}.log",
        conda:
            "../../envs/xstars.yaml"
        shell:
            "xstars catalog items --config-json {params.cfg:q} --sensor {wildcards.sensor} --out {output}"
            " {input.candidates} > {log} 2>&1"

    rule manifest:
        input:
            sites=CATALOG / "sites.parquet",
            candidates=expand(CATALOG / "search" / "shard-{shard}.parquet", shard=range(N_SHARDS)),
            rows=expand(CATALOG / "search" / "shard-{shard}.rows.parquet", shard=range(N_SHARDS)),
            merged_items=expand(CATALOG / "search" / "items" / "{sensor}.parquet", sensor=list(config["sensors"])),
        output:
            manifest=CATALOG / "manifest.parquet",
            item_files=directory(str(CATALOG / "manifest.items")),
            summary=CATALOG / "summary.json",
        params:
            cfg=config_json("catalog manifest"),
            merged_items=CATALOG / "search" / "items",
        log:
            "logs/catalog/manifest.log",
        conda:
            "../../envs/xstars.yaml"
        shell:
            "xstars catalog manifest --config-json {params.cfg:q} --sites {input.sites}"
            " --items {params.merged_items} --out {output.manifest} --summary {output.summary} {input.candidates} > {log} 2>&1"


rule catalog_figure:
    input:
        CATALOG / "manifest.parquet",
    output:
        report(
            CATALOG / "catalog.png",
            caption="../report/catalog.rst",
            category="Catalog",
        ),
    log:
        "logs/catalog/catalog_figure.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars catalog plot --manifest {input} --out {output} > {log} 2>&1"
