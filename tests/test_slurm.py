"""`snakemake --profile slurm build_dataset` on a real one-node SLURM cluster (scripts/slurm-cluster).

Needs root (the cluster's daemons); skipped otherwise, or when the cluster cannot be started
(no apt, no network), except under CI=true, where both are failures. The store built through
SLURM must be identical to the local build of the same config (conftest.demo_build).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, WorkflowRun, in_ci, snakemake

pytestmark = [pytest.mark.root, pytest.mark.slow]

CLUSTER = REPO / "scripts" / "slurm-cluster"


def _skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true: the SLURM tests must run, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node cluster, up; stopped at the end only if this session started it."""
    if os.geteuid() != 0:
        _skip_or_fail("the SLURM tests need root (scripts/slurm-cluster starts system daemons)")
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, check=False).returncode == 0
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=600, check=False)
    if up.returncode != 0:
        _skip_or_fail(f"scripts/slurm-cluster up failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
    # The profile asks up to 2 CPUs and 4000 MB per job: on a smaller node they would stay
    # pending for ever (PartitionConfig) rather than fail.
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=False)
    cpus, mem_mb = (int(value) for value in node.stdout.split()[:2])
    if cpus < 2 or mem_mb < 4000:
        _skip_or_fail(f"the SLURM node has {cpus} CPUs and {mem_mb} MB; the slurm profile asks up to 2 and 4000")
    yield
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, check=False)


def arrays(group, prefix: str = "") -> dict:
    """Every array of a Zarr group and of its subgroups, by path."""
    found = {f"{prefix}{name}": array for name, array in group.arrays()}
    for name, sub in group.groups():
        found |= arrays(sub, f"{prefix}{name}/")
    return found


def attributes(group, prefix: str = "") -> dict:
    """The attributes of a group, its arrays and subgroups, by path."""
    found = {prefix or "/": dict(group.attrs)}
    found |= {f"{prefix}{name}": dict(array.attrs) for name, array in group.arrays()}
    for name, sub in group.groups():
        found |= attributes(sub, f"{prefix}{name}/")
    return found


def failure_report(workdir: Path, result: subprocess.CompletedProcess[str]) -> str:
    """Snakemake's output and the tails of the rule and SLURM logs, for an assertion message."""
    parts = [result.stdout[-3000:], result.stderr[-5000:]]
    for log in sorted([*workdir.glob("logs/**/*.log"), *workdir.glob(".snakemake/slurm_logs/**/*.log")]):
        parts.append(f"--- {log.relative_to(workdir)}\n{log.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


def test_build_dataset_through_slurm_equals_the_local_build(
        slurm_cluster, demo_build: WorkflowRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("XSTARS_SLURM_"):  # the cluster's default partition, no account
            monkeypatch.delenv(name)
    workdir = tmp_path / "slurm"
    workdir.mkdir()
    configfile = demo_build.configfile  # the local build's config, as it is
    # `--profile slurm` exactly as documented, from the repository root (snakemake() runs there).
    # Every job is an sbatch job that inherits this environment (--export=ALL), so `xstars` is
    # found on PATH in .venv/bin, which is on no other PATH. A first status check after 2 s
    # instead of 40 (the demo's jobs take seconds); a failure fails at once, without the retry.
    result = snakemake(
        workdir, "--profile", "slurm", "build_dataset", "--configfile", str(configfile),
        "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", "--retries", "0")
    assert result.returncode == 0, failure_report(workdir, result)
    out = result.stdout + result.stderr
    for rule in ("sites", "search_shard", "manifest_items", "manifest", "store_init", "build_part", "dataset"):
        assert f" {rule}:\n" in out, rule
        assert list(workdir.glob(f".snakemake/slurm_logs/rule_{rule}/**/*.log")), f"{rule} did not run through SLURM"
    assert "has been submitted with SLURM jobid" in out

    # Two builds from scratch (each searched the catalogue itself): the same manifest...
    local_manifest = demo_build.workdir / "results" / "catalog" / "manifest.parquet"
    assert (workdir / "results" / "catalog" / "manifest.parquet").read_bytes() == local_manifest.read_bytes()
    # ...and the same arrays and attributes (shard checksums included).
    import zarr

    local = zarr.open_group(str(demo_build.store), mode="r")
    slurm = zarr.open_group(str(workdir / "results" / "dataset" / "dataset.zarr"), mode="r")
    expected, got = arrays(local), arrays(slurm)
    assert sorted(got) == sorted(expected)
    assert len(expected) > 40  # 4 sensors x 15 arrays
    for path, array in expected.items():
        a, b = array[...], got[path][...]
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), path
    assert attributes(slurm) == attributes(local)

    # Then a tiny pretraining on that store, through SLURM too: a job that asks for its CPUs and
    # memory (pretrain.resources), trains, checkpoints and exports a backbone that loads.
    result = snakemake(
        workdir, "--profile", "slurm", "pretrain", "--configfile", str(configfile),
        "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", "--retries", "0")
    assert result.returncode == 0, failure_report(workdir, result)
    assert list(workdir.glob(".snakemake/slurm_logs/rule_pretrain_run/**/*.log")), "pretrain_run did not use SLURM"
    run = workdir / "results" / "pretrain" / "xstars_dense"
    from xstars.model import load_exported

    _backbone, description = load_exported(run / "backbone.safetensors")
    assert set(description["sensors"]) == {"s2", "l8", "ign", "spot"} and description["training"]["complete"]
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == description["training"]["steps"]
