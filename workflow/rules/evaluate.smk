"""Evaluate stage: downstream tasks on frozen features, every model in the same run (xstars/evaluate.py).

One job per model (each pretraining run, and `random`, a randomly initialised backbone as the
floor) embeds the store and the public benchmarks of evaluate.benchmarks and runs every probe
with every probe seed; `evaluate_report` makes
the table (CSV + Markdown) and the figures of the report.
"""


rule evaluate_model:
    input:
        summary=DATASET / "summary.json",
        backbone=evaluate_backbone_input,
        benchmarks=evaluate_benchmarks_input,
    output:
        EVALUATE / "models" / "{model}.json",
    params:
        cfg=config_json("evaluate model"),
        store=STORE,
        runs=PRETRAIN,
    threads: config["evaluate"]["resources"]["cpus"]
    resources:
        gpu=config["evaluate"]["resources"]["gpus"],
        cpus_per_task=config["evaluate"]["resources"]["cpus"],
        mem_mb=config["evaluate"]["resources"]["mem_mb"],
        runtime=config["evaluate"]["resources"]["runtime_min"],
    log:
        "logs/evaluate/{model}.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars evaluate model --config-json {params.cfg:q} --store {params.store} --model {wildcards.model}"
        " --runs-dir {params.runs} --out {output} > {log} 2>&1"


rule evaluate_report:
    input:
        expand(EVALUATE / "models" / "{model}.json", model=EVALUATE_MODELS),
    output:
        csv=EVALUATE / "results.csv",
        table=report(EVALUATE / "results.md", caption="../report/evaluate_table.rst", category="Evaluation"),
        curves=report(
            EVALUATE / "label_efficiency.png", caption="../report/evaluate_label_efficiency.rst", category="Evaluation"
        ),
        examples=report(
            EVALUATE / "retrieval_examples.png", caption="../report/evaluate_retrieval.rst", category="Evaluation"
        ),
    params:
        store=STORE,
        seeds=",".join(str(s) for s in config["evaluate"]["probe_seeds"]),
        out_dir=lambda wildcards, output: Path(output.csv).parent,
    log:
        "logs/evaluate/report.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars evaluate report --store {params.store} --out-dir {params.out_dir} --seeds {params.seeds}"
        " {input} > {log} 2>&1"
