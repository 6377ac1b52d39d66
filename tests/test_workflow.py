"""The Snakemake workflow parses, lints clean and validates its config (no job is run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    for rule in ("demo_world", "demo_preview", "sites", "search_shard", "manifest", "all"):
        assert f"rule {rule}:" in result.stdout, rule
    assert "xstars demo generate --root demo_world --demo-json" in result.stdout


def test_dry_run_of_the_real_build_parses() -> None:
    result = snakemake_dry_run("all")
    assert result.returncode == 0, result.stderr + result.stdout


def test_invalid_config_stops_the_workflow_naming_the_key() -> None:
    result = snakemake_dry_run("all", "--config", "world=demo", "sensors={s2: {gsdm: 1}}")
    assert result.returncode != 0
    assert "config key 'sensors.s2.gsdm': unknown key" in result.stdout + result.stderr


def test_nested_command_line_values_get_their_yaml_types() -> None:
    # Snakemake leaves nested --config scalars as strings; common.smk re-types them.
    result = snakemake_dry_run("all", "--config", "world=demo", "stac={max_retries: 3}")
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
    assert config["stac"]["url"].startswith("http://127.0.0.1:")
    assert config["sites"]["cities"] == ["toulouse", "bordeaux", "lyon"]
