"""The xstars command line, run in-process: config commands and error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from xstars.cli import main
from xstars.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands read ./config.yaml by default."""
    monkeypatch.chdir(REPO)


def test_config_show_applies_world_and_set(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["config", "show", "--world", "demo", "--set", "http.max_retries=2", "--set", "seed=7"]
    assert main(args) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["http"]["max_retries"] == 2
    assert shown["seed"] == 7
    assert shown["catalogs"]["planetary_computer"]["url"].startswith("http://127.0.0.1:")
    # What it prints is a complete config that loads back to itself.
    assert load_config(REPO / "config.yaml", shown) == shown


def test_config_error_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "sensors.s2.gsd_m=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'sensors.s2.gsd_m': -1 is less than")
    assert "Traceback" not in err


def test_missing_config_file_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_generate_validates_demo_json_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = json.dumps({"cities": [{"name": "toulouse", "lon": 1.44, "lat": 43.6}], "portt": 1})
    assert main(["demo", "generate", "--root", str(tmp_path), "--demo-json", bad]) == 2
    assert "config key 'demo.portt': unknown key" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_demo_json_excludes_config_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "generate", "--demo-json", "{}", "--world", "demo"]) == 2
    assert "--demo-json replaces" in capsys.readouterr().err


def test_demo_status_without_a_server_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "status", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.startswith("down ")
