"""The released MSC-France layout: a fake download imported, trained and evaluated on through the
README's commands, exported back to the same files, and bad folders refused in one line."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.data.msc_france import data as fake
from tests.test_pretrain import TINY
from xstars.cli import main
from xstars.layout import LAYOUT_VERSION, image_sensors, labels_sensor, open_store, store_sensors

REPO = Path(__file__).resolve().parents[1]
#: Released folder -> the store sensor msc_france.import_sensors makes of it (the defaults).
SENSORS = {"SPOT": "spot", "Sentinel": "sentinel", "Landsat": "landsat"}
#: What the README's import command chooses: validation and test cities, training the rest.
SPLITS = {"Bordeaux": "val", "Toulouse": "test", "Lyon": "train"}


def readme_commands(download: Path, results: Path) -> list[list[str]]:
    """The README's commands for the published download (<!-- msc-france-commands -->), as argv
    lists without the leading ``xstars``, run on ``download`` and writing under ``results``."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- msc-france-commands -->\n```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md: the commands for the released download (<!-- msc-france-commands -->) are missing"
    text = (block.group(1).replace("\\\n", " ").replace("$TILE_M", f"{fake.FOOTPRINT_M:g}")
            .replace("MSC-France/", f"{download}/").replace("results/msc_france", str(results)))
    commands = [shlex.split(line) for line in text.splitlines() if line.strip()]
    assert all(argv[0] == "xstars" for argv in commands), commands
    return [argv[1:] for argv in commands]


def tiny(section: str, values: dict) -> list[str]:
    """``--set`` options giving ``section`` these values (a run small enough for a CPU test)."""
    return [option for key, value in values.items() for option in ("--set", f"{section}.{key}={json.dumps(value)}")]


def one_error_line(capsys: pytest.CaptureFixture[str], status: int) -> str:
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    """The fake download, written by the committed generator."""
    return fake.write(tmp_path_factory.mktemp("download") / "MSC-France")


@pytest.fixture(scope="module")
def imported(download: Path, tmp_path_factory) -> dict:
    """The download imported by the README's import command (through the CLI)."""
    results = tmp_path_factory.mktemp("results")
    commands = readme_commands(download, results)
    assert commands[0][:2] == ["import", "msc-france"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the commands read ./config.yaml
        assert main(commands[0]) == 0
    return {"store": results / "dataset.zarr", "results": results, "commands": commands}


# ================================================================================= import


def test_the_import_stores_every_sensor_city_and_tile(imported: dict, download: Path) -> None:
    root = open_store(imported["store"])
    meta = root.attrs["xstars"]
    assert meta["layout_version"] == LAYOUT_VERSION and meta["footprint_m"] == fake.FOOTPRINT_M
    assert meta["georeferenced"] is False and meta["source"] == "msc-france"
    # The store records its sensors and their roles, as a built one does (no label group).
    assert store_sensors(root) == {name: {"role": "image", "folder": folder} for folder, name in SENSORS.items()}
    assert image_sensors(root) == list(SENSORS.values()) and labels_sensor(root) is None
    places = [(city, name) for city in sorted(fake.CITIES) for name in fake.tile_names()]
    n = len(places)
    for folder, name in SENSORS.items():
        group, px = root[name], fake.SENSORS[folder]
        assert group["data"].shape == (n, 3, px, px) and group["data"].dtype == np.uint8
        assert list(group["band"][:]) == ["R", "G", "B"]
        assert group["data"].attrs["gsd_m"] == fake.FOOTPRINT_M / px and group["data"].attrs["scale_factor"] == 1 / 255
        assert list(group["site_id"][:]) == [f"{city}_{tile}" for city, tile in places]
        # The city is the split unit: the README's val and test cities, every other city trains.
        assert list(group["region"][:]) == [city for city, _ in places]
        assert list(group["split"][:]) == [SPLITS[city] for city, _ in places]
        assert len(group.attrs["normalization"]["mean"]) == 3
        for i, (city, tile) in enumerate(places):
            if (city, tile) == fake.MISSING[1:]:
                continue  # below
            # The released images, 8-bit as the released loader reads them (PIL, RGB).
            assert np.array_equal(group["data"][i], _rgb(download / folder / city / f"{tile}.png").transpose(2, 0, 1))
            assert group["status"][i] == "ok" and group["valid"][i].all()
            assert group["item_id"][i] == f"{folder}/{city}/{tile}.png"
    # The place Landsat lacks is stored by every sensor as dropped, naming the missing file; no pixel.
    dropped = places.index(fake.MISSING[1:])
    for name in SENSORS.values():
        assert root[name]["status"][dropped] == "dropped: Landsat missing (Landsat/Lyon/0004.*)"
        assert not root[name]["valid"][dropped].any() and not root[name]["data"][dropped].any()
    assert [s for s in root["spot"]["status"][:] if s != "ok"] == [root["spot"]["status"][dropped]]


# ============================================================== the trainer and the evaluation


def test_the_readme_commands_pretrain_and_evaluate_on_the_imported_store(
        imported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pretrain, evaluate = imported["commands"]
    assert pretrain[:2] == ["pretrain", "run"] and evaluate[:2] == ["evaluate", "model"]
    monkeypatch.chdir(REPO)
    # The README's commands, with a run small enough for CPU: ViT-Tiny at 32 px, 2 epochs.
    # The tiny run's sizes; its sensors stay those the README's command names.
    small = {key: value for key, value in TINY.items() if key not in ("sensors", "dino_sensors")}
    assert main(pretrain + tiny("pretrain", small)) == 0
    run = imported["results"] / "pretrain" / "xstars_dense"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert steps and all(np.isfinite(m["loss"]) for m in steps)
    assert (run / "backbone.safetensors").is_file()
    assert main(evaluate) == 0
    result = json.loads((imported["results"] / "evaluate" / "xstars_dense.json").read_text())
    # No label group: cross-sensor retrieval between every ordered pair of the three sensors, no probe.
    pairs = {(r["train_sensor"], r["test_sensor"]) for r in result["records"]}
    assert pairs == {(a, b) for a in SENSORS.values() for b in SENSORS.values() if a != b}
    assert {r["task"] for r in result["records"]} == {"retrieval"}
    assert all(0 <= r["value"] <= 1 for r in result["records"])


# ============================================================================ round trip


def test_export_then_import_gives_back_the_same_images_and_names(
        imported: dict, download: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "MSC-France-again"
    assert main(["export", "msc-france", str(imported["store"]), str(out)]) == 0
    # Every place kept by all three sensors, under its own name; the one Landsat lacks is left out
    # of every folder (a released place has a tile per sensor).
    for folder in SENSORS:
        written = sorted(p.relative_to(out / folder).as_posix() for p in (out / folder).rglob("*.png"))
        given = sorted(p.relative_to(download / folder).as_posix() for p in (download / folder).rglob("*.png"))
        assert written == [p for p in given if p != "Lyon/0004.png"], folder
        for path in written:  # 8-bit exact
            assert np.array_equal(_rgb(out / folder / path), _rgb(download / folder / path)), (folder, path)
    assert "| Sentinel/ | `sentinel`:" in (out / "README.md").read_text()
    again = tmp_path / "again.zarr"
    status = main(["import", "msc-france", str(out), "--out", str(again),
                   "--set", f"msc_france.footprint_m={fake.FOOTPRINT_M:g}",
                   "--set", "msc_france.val_cities=[Bordeaux]", "--set", "msc_france.test_cities=[Toulouse]"])
    assert status == 0
    first, second = open_store(imported["store"]), open_store(again)
    kept = [i for i, s in enumerate(first["spot"]["status"][:]) if s == "ok"]
    for name in SENSORS.values():
        assert list(second[name]["site_id"][:]) == [first[name]["site_id"][i] for i in kept]
        assert list(second[name]["split"][:]) == [first[name]["split"][i] for i in kept]
        assert np.array_equal(second[name]["data"][:], first[name]["data"][:][kept]), name
        assert set(second[name]["status"][:]) == {"ok"}


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# =========================================================================== bad folders


def test_bad_folders_are_refused_in_one_line(
        download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.chdir(REPO)

    def run(source: Path, *options: str) -> str:
        store = tmp_path / f"{source.name}.zarr"
        line = one_error_line(capsys, main(["import", "msc-france", str(source), "--out", str(store),
                                            "--set", f"msc_france.footprint_m={fake.FOOTPRINT_M:g}", *options]))
        assert not store.exists(), line  # refused before anything is written
        return line

    # No sensor folder: the folder named, what it holds, and the key that lists the sensors.
    other = tmp_path / "no_sensors"
    (other / "images" / "Lyon").mkdir(parents=True)
    line = run(other)
    assert f"error: {other}/SPOT: no such folder (msc_france.import_sensors names 'SPOT'; {other} has ['images'])" \
        in line
    # A city folder with a tile of another size: that file, its size and the size of the others.
    sizes = tmp_path / "sizes"
    shutil.copytree(download, sizes)
    odd = sizes / "Sentinel" / "Toulouse" / "0002.png"
    Image.new("RGB", (20, 20)).save(odd)
    assert f"error: {odd}: 20 x 20 pixels, the other tiles of Sentinel/ are 32 x 32" in run(sizes)
    # A file that is not an image, with an image's name.
    broken = tmp_path / "broken"
    shutil.copytree(download, broken)
    (broken / "Landsat" / "Bordeaux" / "0003.png").write_text("not a png")
    assert f"error: {broken}/Landsat/Bordeaux/0003.png: not a readable image" in run(broken)
    # The ground size of a tile is not in the download: 0 (the default) is asked for by its key.
    line = run(download, "--set", "msc_france.footprint_m=0")
    assert line.startswith("error: config key 'msc_france.footprint_m': not set") and "--set" in line
    # A split city that is not a folder of the download.
    line = run(download, "--set", "msc_france.test_cities=[Paris]")
    assert line.startswith("error: config key 'msc_france.test_cities.0': 'Paris' is not a city of the folder")
    assert not any(tmp_path.glob("*.zarr"))


def test_config_accepts_the_imported_sensor_names_and_names_both_lists_otherwise() -> None:
    from xstars.config import load_config
    from xstars.errors import ConfigError

    names = list(SENSORS.values())
    config = load_config(REPO / "config.yaml", {"pretrain": {"sensors": names, "dino_sensors": names},
                                                "evaluate": {"sensors": names}})
    assert config["evaluate"]["sensors"] == names
    renamed = {"msc_france": {"import_sensors": {"Sentinel": {"sensor": "sen", "bands": ["R", "G", "B"]}}},
               "evaluate": {"sensors": ["sentinel"]}}
    with pytest.raises(ConfigError, match=re.escape("'evaluate.sensors[0]': 'sentinel' is not an image sensor of "
                                                    "sensors (s2, l8, ign, spot) nor of msc_france.import_sensors (sen)")):
        load_config(REPO / "config.yaml", renamed)
