"""The offline demo world: generate it, then render an overview figure for the report."""


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
