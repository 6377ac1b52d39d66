"""envs/*.yaml (conda, for clusters and --sdm conda) keeps in step with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))

#: conda-forge names of PyPI packages that are named differently there.
CONDA_TO_PYPI = {"matplotlib-base": "matplotlib", "pytorch": "torch"}
#: What an environment may hold beyond pyproject's dependencies: the interpreter and the build
#: tools, the C library (GDAL), torch (pinned by the Makefile, not by pyproject).
CONDA_ONLY = {"python", "pip", "setuptools", "gdal", "torch"}


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_dependencies() -> dict[str, Requirement]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [Requirement(spec) for spec in pyproject["project"]["dependencies"]]
    return {normalise(req.name): req for req in requirements}


def conda_spec(spec: str) -> tuple[str, str, str]:
    """("conda-forge::gdal>=3.8" ->) channel, PyPI-normalised name, version specifier."""
    channel, _, rest = spec.rpartition("::")
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", rest)
    assert match, f"unreadable conda spec {spec!r}"
    name = normalise(match.group(1))
    return channel, CONDA_TO_PYPI.get(name, name), match.group(2).replace(" ", "")


def environment(path: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Channels, and {name: (where, version specifier)} over the conda and pip sections."""
    env = yaml.safe_load(path.read_text())
    found: dict[str, tuple[str, str]] = {}
    for entry in env.get("dependencies", []):
        if isinstance(entry, dict):
            for spec in entry.get("pip", []):
                req = Requirement(spec)
                found[normalise(req.name)] = ("pip", str(req.specifier))
        else:
            channel, name, version = conda_spec(str(entry))
            found[name] = (channel or "conda", version)
    return env.get("channels", []), found


def test_there_is_an_environment() -> None:
    assert (REPO / "envs" / "xstars.yaml") in ENVS


def test_every_project_dependency_is_in_an_environment_with_the_same_bounds() -> None:
    listed: dict[str, tuple[str, str]] = {}
    for path in ENVS:
        listed |= environment(path)[1]
    for name, req in project_dependencies().items():
        assert name in listed, f"{name} (pyproject.toml) is in no envs/*.yaml: add it (conda-forge or pip section)"
        where, version = listed[name]
        assert set(version.split(",")) - {""} == set(str(req.specifier).split(",")) - {""}, (
            f"{name}: {req.specifier} in pyproject.toml, {version or 'no bound'} in envs ({where})")


def test_environments_hold_nothing_that_pyproject_does_not_name() -> None:
    allowed = set(project_dependencies()) | CONDA_ONLY
    for path in ENVS:
        extra = set(environment(path)[1]) - allowed
        assert not extra, f"{path.name}: {sorted(extra)} not in pyproject.toml's dependencies"


def test_gdal_comes_from_conda_forge() -> None:
    channels, listed = environment(REPO / "envs" / "xstars.yaml")
    assert "gdal" in listed, "envs/xstars.yaml must list gdal (conda-forge's GDAL, for rasterio)"
    where, _ = listed["gdal"]
    assert where == "conda-forge" or (where == "conda" and channels[:1] == ["conda-forge"]), (
        f"gdal must come from conda-forge: channels {channels}, gdal from {where}")
    assert "defaults" not in channels
