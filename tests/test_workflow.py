"""The Snakemake workflow parses, lints clean and validates its config (no job is run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command of this environment from the repository root, as a person would."""
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def snakemake_dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    # --forceall lists every job even where outputs exist; --nolock lets it run beside a real
    # run in the same checkout. Targets go before --config (which takes all words after it).
    return run("snakemake", "-n", "--forceall", "--nolock", *args)


def test_dry_run_of_the_demo_world_lists_its_jobs() -> None:
    result = snakemake_dry_run("all", "--config", "world=demo")
    assert result.returncode == 0, result.stderr + result.stdout
    for rule in ("demo_world", "demo_preview", "demo_benchmarks", "sites", "search_shard", "manifest_items", "manifest",
                 "all"):
        assert f"rule {rule}:" in result.stdout, rule
    assert "xstars demo generate --root demo_world --demo-json" in result.stdout
    # The evaluation reads the fake benchmark copies: they are its input.
    assert "xstars demo benchmarks --out demo_world/benchmarks" in result.stdout
    evaluate_jobs = [job for job in result.stdout.split("\nrule ")[1:] if job.startswith("evaluate_model:")]
    assert evaluate_jobs and all("demo_world/benchmarks/benchmarks.json" in job for job in evaluate_jobs)


def test_every_rule_passes_the_config_sections_its_command_reads() -> None:
    """Each job's `xstars <group> <command> --config-json JSON` carries exactly the sections
    that command declares (xstars.cli.SECTIONS): no more (a change to another section would
    rerun it for nothing), no fewer (the command refuses a missing section)."""
    import shlex

    from xstars.cli import SECTIONS

    result = snakemake_dry_run("all", "--printshellcmds", "--config", "world=demo")
    assert result.returncode == 0, result.stderr + result.stdout
    seen = set()
    for line in result.stdout.splitlines():
        if "--config-json" not in line:
            continue
        words = shlex.split(line.strip())
        start = words.index("xstars")
        command = f"{words[start + 1]} {words[start + 2]}"
        given = json.loads(words[words.index("--config-json") + 1])
        assert command in SECTIONS, command
        assert set(given) == set(SECTIONS[command]), (command, sorted(given), sorted(SECTIONS[command]))
        seen.add(command)
    assert seen >= {"catalog sites", "catalog search", "catalog items", "catalog manifest", "build init", "build part",
                    "build finalize", "build publish", "pretrain run", "evaluate model"}


def test_dry_run_of_the_real_build_parses() -> None:
    result = snakemake_dry_run("all")
    assert result.returncode == 0, result.stderr + result.stdout


#: The France-wide build documented in README.md ("All of France").
FRANCE = ("sites={uniform_count: 30000}", "build={samples_per_shard: 64, sites_per_group: 1024}",
          "catalog={search_shards: 64}", "http={cache_mb: 1024}")


def job_counts(stdout: str) -> dict[str, int]:
    """Snakemake's "Job stats" table, rule -> count."""
    table = stdout.split("Job stats:")[1].split("total")[0]
    return {line.split()[0]: int(line.split()[1]) for line in table.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}


def test_dry_run_of_all_of_france_plans_every_job_per_rule() -> None:
    # 12 cities x 80 sites + 30,000 drawn over the country: 30,960 tiles, 64 per build job. The
    # whole DAG, build jobs included, is planned before any search (the site count is fixed by
    # the config), so this is what `--profile slurm` would submit.
    from xstars.config import load_config
    from xstars.sites import sample_sites

    result = snakemake_dry_run("all", "--quiet", "rules", "--config", *FRANCE)
    assert result.returncode == 0, result.stderr + result.stdout
    config = load_config(REPO / "config.yaml", yaml.safe_load("\n".join(f"{k}: {v}" for k, v in
                                                                          (a.split("=", 1) for a in FRANCE))))
    sites = len(sample_sites(config))  # drawn exactly, as the `sites` job will
    assert sites == 12 * 80 + 30000
    runs = len(config["pretrain"]["runs"])
    expected = {"sites": 1, "search_shard": 64, "manifest_items": len(config["sensors"]), "manifest": 1,
                "catalog_figure": 1, "store_init": 1, "build_group": -(-sites // 1024),
                "build_part": -(-sites // 64), "dataset": 1, "dataset_figures": 1, "verify_dataset": 1, "publish_dataset": 1,
                "pretrain_run": runs, "pretrain_figure": 1, "evaluate_model": runs + 1, "evaluate_report": 1, "all": 1}
    assert job_counts(result.stdout) == expected
    assert expected["build_part"] == 484  # hundreds of jobs, not one per tile
    assert expected["build_group"] == 31  # the reads, by locality: 1,024 sites each


def test_jobs_querying_the_wms_share_its_rate_limit() -> None:
    from xstars.config import load_config
    from xstars.remote import WmsClient

    config = load_config(REPO / "config.yaml", {"catalogs": {"geoplateforme": {"max_concurrent_jobs": 4}}})
    assert WmsClient(config["catalogs"]["geoplateforme"], config["http"]).min_interval_s == 4 / 40  # 10/s each
    result = snakemake_dry_run("build_dataset", "--config", "world=demo",
                               "catalogs={geoplateforme: {max_concurrent_jobs: 4}}")
    assert result.returncode == 0, result.stderr + result.stdout
    jobs = result.stdout.split("\nrule ")[1:]
    wms_jobs = [job for job in jobs if job.startswith(("search_shard:", "build_group:"))]
    assert len(wms_jobs) == 2 + 2  # the demo's search shards and locality groups (48 sites, 24 a group)
    assert all("wms_jobs_geoplateforme=1" in job for job in wms_jobs)
    assert not any("wms_jobs_geoplateforme" in job for job in jobs if job not in wms_jobs)


@pytest.mark.parametrize(("args", "gpus"), [
    ((), 4),  # config.yaml's pretrain.resources
    (("--config", "pretrain={resources: {gpus_per_node: 2}}"), 2),
    (("--set-resources", "pretrain_run:gpu=1"), 1),  # a user's override on the command line
])
def test_pretrain_jobs_ask_for_the_gpus_and_start_one_process_each(args: tuple[str, ...], gpus: int) -> None:
    # What `--profile slurm pretrain` submits: the rule's resources, which the SLURM executor
    # turns into `--gpus=N`, and a command that starts N processes through torchrun.
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    result = snakemake_dry_run("pretrain", *args)
    assert result.returncode == 0, result.stderr + result.stdout
    jobs = [job for job in result.stdout.split("\nrule ")[1:] if job.startswith("pretrain_run:")]
    assert len(jobs) == 3  # xstars_original, xstars_dense, dino_only
    for job in jobs:
        resources = dict(item.split("=", 1) for item in job.split("resources: ")[1].splitlines()[0].split(", "))
        assert resources["gpu"] == str(gpus)
        if not args or args[0] == "--config":  # CPUs and memory follow the GPUs asked in the config
            assert (resources["cpus_per_task"], resources["mem_mb"]) == (str(8 * gpus), str(64000 * gpus))
        assert f"--nproc {gpus} " in job
        job_seen_by_executor = SimpleNamespace(resources=Resources(gpu=int(resources["gpu"])))
        assert set_gres_string(job_seen_by_executor) == f" --gpus={gpus}"


class Resources(dict):
    """A job's resources as the SLURM executor reads them (by key and by attribute)."""

    __getattr__ = dict.get


def test_a_manifest_of_another_config_stops_the_build_before_writing(tmp_path: Path) -> None:
    from xstars.cli import main
    from xstars.manifest import ManifestRow, write_manifest

    def row(site_id: str, col: int) -> ManifestRow:
        return ManifestRow(site_id=site_id, region="r", split="train", col=col, row=0, footprint_m=480.0, sensor="s2",
                           status="dropped", reason="s2: no item covers the footprint in the searched windows",
                           reason_code="no_item", reason_sensor="s2", collection="", item_id="", datetime="",
                           eo_cloud_cover=None, cloud_fraction=None, nodata_fraction=None, invalid_fraction=None,
                           assets=("B04",), fallbacks=(), n_candidates=0)

    # A real manifest of two sites: the demo config plans many more.
    write_manifest([row("a", 0), row("b", 1)], {}, tmp_path / "manifest.parquet", "EPSG:2154", {}, 16)
    code = main(["build", "init", "--config-json", json.dumps({"world": "demo"}), "--manifest",
                 str(tmp_path / "manifest.parquet"), "--store", str(tmp_path / "dataset.zarr"),
                 "--out", str(tmp_path / "init.json")])
    assert code == 2 and not (tmp_path / "dataset.zarr").exists()


def test_invalid_config_stops_the_workflow_naming_the_key() -> None:
    result = snakemake_dry_run("all", "--config", "world=demo", "sensors={s2: {gsdm: 1}}")
    assert result.returncode != 0
    assert "config key 'sensors.s2.gsdm': unknown key" in result.stdout + result.stderr


def test_nested_command_line_values_get_their_yaml_types() -> None:
    # Snakemake leaves nested --config scalars as strings; common.smk re-types them.
    result = snakemake_dry_run("all", "--config", "world=demo", "http={max_retries: 3}")
    assert result.returncode == 0, result.stderr + result.stdout


def test_lint_is_clean() -> None:
    result = run("snakemake", "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_show_prints_the_resolved_demo_world() -> None:
    result = run("xstars", "config", "show", "--world", "demo")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["world"] == "demo"
    assert "worlds" not in config
    assert config["catalogs"]["planetary_computer"]["url"].startswith("http://127.0.0.1:")
    assert config["sites"]["cities"] == ["toulouse", "bordeaux", "lyon", {"name": "etercy", "lon": 6.002, "lat": 45.9}]
