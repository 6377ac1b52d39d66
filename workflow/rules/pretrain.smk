"""Pretrain stage: X-STARS (DINO + MSAD) on the Zarr store (xstars/data.py, model.py, train.py).

One job per run of `pretrain.runs` (X-STARS variants and baselines, same budget). A job asks
the scheduler for `pretrain.resources` (GPUs on one node, CPUs and memory per GPU); the
command starts one process per GPU through torchrun. A killed job resumes from its last
checkpoint (results/pretrain/<run>/checkpoint.pt, not an output: Snakemake keeps it).
"""


rule pretrain_run:
    input:
        summary=DATASET / "summary.json",
        source=pretrain_source_input,
    output:
        backbone=PRETRAIN / "{run}" / "backbone.safetensors",
        description=PRETRAIN / "{run}" / "backbone.json",
        metrics=PRETRAIN / "{run}" / "metrics.jsonl",
    params:
        cfg=pretrain_run_json,
        store=STORE,
        out_dir=lambda wildcards: PRETRAIN / wildcards.run,
        # One process per GPU the job is given (pretrain.resources, or --set-resources), 1 on CPU.
        nproc=lambda wildcards, resources: max(int(resources.gpu), 1),
    # The trainings are the longest jobs: started before the evaluations and the dataset's
    # checks and figures, which fill the cores around them (on 2 cores, make demo ~1 min sooner).
    priority: 10
    threads: PRETRAIN_CPUS
    resources:
        gpu=PRETRAIN_GPUS,
        cpus_per_task=PRETRAIN_CPUS,
        mem_mb=PRETRAIN_MEM_MB,
        runtime=config["pretrain"]["resources"]["runtime_min"],
    log:
        "logs/pretrain/{run}.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars pretrain run --config-json {params.cfg:q} --store {params.store} --run {wildcards.run}"
        " --out-dir {params.out_dir} --nproc {params.nproc} > {log} 2>&1"


rule pretrain_figure:
    input:
        metrics=expand(PRETRAIN / "{run}" / "metrics.jsonl", run=PRETRAIN_RUNS),
    output:
        report(PRETRAIN / "losses.png", caption="../report/pretrain_losses.rst", category="Pretraining"),
    log:
        "logs/pretrain/figure.log",
    conda:
        "../../envs/xstars.yaml"
    shell:
        "xstars pretrain figure --out {output} {input.metrics} > {log} 2>&1"
