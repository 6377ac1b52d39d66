"""The offline demo world: generate it, render an overview figure for the report, and write fake
copies of the public benchmarks for the evaluation."""


rule demo_world:
    output:
        world=DEMO_ROOT / "world.json",
    params:
        root=output_folder,
        demo=DEMO_JSON,
    log:
        "logs/demo/demo_world.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars demo generate --root {params.root} --demo-json {params.demo:q} > {log} 2>&1"


rule demo_preview:
    input:
        world=DEMO_ROOT / "world.json",
    output:
        report(
            RESULTS / "preview.png",
            caption="../report/demo_preview.rst",
            category="Demo world",
        ),
    params:
        root=input_folder,
    log:
        "logs/demo/demo_preview.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars demo preview --root {params.root} --out {output} > {log} 2>&1"


# Fake copies of EuroSAT, BigEarthNet, FLAIR and the generic layouts, in their published layouts,
# that the demo world's evaluate.benchmarks point at (xstars/demo/benchmarks.py).
rule demo_benchmarks:
    output:
        DEMO_BENCHMARKS / "benchmarks.json",
    params:
        out=output_folder,
        seed=config["demo"]["seed"],
    log:
        "logs/demo/demo_benchmarks.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars demo benchmarks --out {params.out} --seed {params.seed} > {log} 2>&1"
