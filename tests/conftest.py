"""Shared fixtures: a small generated demo world, served by the real loopback servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "planetary-computer"

#: A demo world small enough for tests (1.28 km cities): toulouse (an orbit-edge scene crosses
#: it), bordeaux (Sentinel-2 tiles of zones 30 and 31), etercy (zone 32N on the 31/32 border, a
#: WorldCover tile edge). The workflow tests use the first two only.
SMALL_DEMO = {
    "seed": 7,
    "extent_m": 1280,
    "label_gsd_m": 0.5,
    "cities": [
        {"name": "toulouse", "lon": 1.4442, "lat": 43.6047},
        {"name": "bordeaux", "lon": -0.5792, "lat": 44.8378},
        {"name": "etercy", "lon": 6.002, "lat": 45.90},
    ],
}


#: One short pretraining run for the workflow tests (the build rules do not read this section,
#: so the same config serves the build and the pretraining). It fits a 2-CPU node, no GPU.
TINY_PRETRAIN = {
    # The demo world's dense run pairs at its own sizes (64 px): here every view is 32 px.
    "runs": {"xstars_dense": {"msad": {"variant": "dense"}, "views": {"paired_px": {"s2": 32, "l8": 32, "ign": 32, "spot": 32}}}},
    "model": {"arch": "vit_tiny", "dino_out_dim": 256, "dino_hidden_dim": 64, "dino_bottleneck_dim": 32},
    "views": {"global_px": 32, "local_px": 16, "local_crops": 2, "paired_px": {}},
    "msad": {"dense": {"proj_dim": 16, "tokens_per_tile": 0}},
    "optim": {"batch_size_per_gpu": 2, "epochs": 2, "warmup_epochs": 1},
    "loader": {"num_workers": 0, "shuffle_buffer": 4},
    "resources": {"gpus_per_node": 0, "cpus_per_gpu": 2, "mem_mb_per_gpu": 3000, "runtime_min": 20},
}


TINY_EVALUATE = {"probe_seeds": [0, 1, 2], "label_fractions": [0.5, 1.0], "segmentation_epochs": 5,
                 "resources": {"gpus": 0, "cpus": 2, "mem_mb": 3000, "runtime_min": 20}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_endpoint(monkeypatch):
    """Points the Planetary Computer SDK's token requests at a loopback server.

    The SDK reads its endpoint from the environment variable PC_SDK_SAS_URL (its settings are
    cached: the cache is cleared around the test) and caches tokens per container (cleared too).
    Yields a function installing the server's answers: a list, the last one repeated.
    """
    from planetary_computer import sas
    from planetary_computer.settings import Settings

    from tests.loopback import serve

    plan: list = []

    def answer(request):
        return plan.pop(0) if len(plan) > 1 else plan[0]

    with serve(answer) as server:
        monkeypatch.setenv("PC_SDK_SAS_URL", f"{server.url}/api/sas/v1/token")
        Settings.get.cache_clear()
        sas.TOKEN_CACHE.clear()

        def answers(*given):
            plan[:] = list(given)
            return server

        yield answers
    Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated demo world (generated once per test session)."""
    from xstars.demo.generate import generate_world

    root = tmp_path_factory.mktemp("demo_world")
    generate_world(root, SMALL_DEMO)
    return root


@pytest.fixture(scope="session")
def demo_server(demo_root: Path):
    """The demo world served on free loopback ports; stopped at the end of the session."""
    from xstars.demo import control

    info = control.start(demo_root, host="127.0.0.1", port=free_port(), backend_port=free_port())
    yield info
    control.stop(demo_root)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the repository's workflow in `workdir`, from the repository root, with this venv on PATH.

    From the root, as a person would: that is where `--profile slurm` is found.
    """
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def world_configfile(path: Path, demo_root: Path, info, overlay: dict | None = None, **extra) -> Path:
    """A --configfile for the small demo world served by `info`; `extra` goes into `catalog`,
    `overlay` (e.g. {"pretrain": {...}}) is merged over the test world's settings.

    It holds the whole resolved config: config.yaml's demo world with the test world merged in.
    With --directory, Snakemake looks for the Snakefile's `configfile: "config.yaml"` in the
    working directory and, a --configfile being given, skips it silently; and values given with
    --configfile win over the world overlay. So the overlay is applied here, once.
    """
    from xstars.config import deep_merge, read_yaml, resolve_world

    world = {
        "results_dir": "results",
        "http": {"backoff_s": 0.05},
        "demo": {**SMALL_DEMO, "root": str(demo_root), "port": info.port, "stac_backend_port": info.backend_port},
        "sites": {"cities": ["toulouse", "bordeaux"], "footprint_m": 240, "city_radius_m": 360, "sites_per_city": 4,
                  "split": {"method": "cities", "val_cities": [], "test_cities": ["bordeaux"]}},
        "catalog": {"search_shards": 2, "search_cell_m": 4800, **extra},
        # 8 sites: three locality groups read them, three parts pack (build.sites_per_group).
        "build": {"samples_per_shard": 3, "sites_per_group": 3, "margin_m": 240},
    }
    world = deep_merge(world, overlay or {})
    config = deep_merge(read_yaml(REPO / "config.yaml"), {"world": "demo", "worlds": {"demo": world}})
    path.write_text(yaml.safe_dump({**resolve_world(config), "worlds": {"demo": {}}}))
    return path


@dataclass(frozen=True)
class WorkflowRun:
    workdir: Path
    configfile: Path
    result: subprocess.CompletedProcess[str]

    @property
    def store(self) -> Path:
        return self.workdir / "results" / "dataset" / "dataset.zarr"


@pytest.fixture(scope="session")
def demo_build(demo_root: Path, demo_server, tmp_path_factory: pytest.TempPathFactory) -> WorkflowRun:
    """`snakemake build_dataset` of the small demo world, run locally once per session.

    The reference build: the frozen rebuild (test_workflow_build) and the SLURM build
    (test_slurm) must give the same store.
    """
    from xstars.demo import control

    control.set_faults(demo_server, {})
    workdir = tmp_path_factory.mktemp("demo_build")
    configfile = world_configfile(workdir.parent / f"{workdir.name}.yaml", demo_root, demo_server,
                                  overlay={"pretrain": TINY_PRETRAIN, "evaluate": TINY_EVALUATE})
    result = snakemake(workdir, "build_dataset", "--configfile", str(configfile))
    if result.returncode != 0:
        pytest.fail("local build_dataset failed:\n" + result.stdout[-4000:] + result.stderr[-4000:])
    return WorkflowRun(workdir, configfile, result)
