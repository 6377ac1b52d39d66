"""Bad stores get one clear line wherever a store is read; the store's sensors and their roles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr

from tests.synthetic_store import write_store
from xstars.cli import main
from xstars.errors import DataError
from xstars.layout import LAYOUT_VERSION, image_sensors, labels_sensor, open_store, store_sensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("good") / "dataset.zarr", samples=6, samples_per_shard=3)


def bad_stores(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Stores a new user may point a command at -> (path, what the one line must say)."""
    import shutil

    not_json = folder / "not_json.zarr"
    not_json.mkdir()
    (not_json / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group",')
    a_file = folder / "a_file.zarr"
    a_file.write_text("not a folder")
    empty = folder / "empty.zarr"
    empty.mkdir()
    foreign = folder / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w", zarr_format=3).attrs["title"] = "somebody else's store"
    stores = {"missing": (folder / "missing.zarr", "missing.zarr: no such store"),
              "not_json": (not_json, "not_json.zarr/zarr.json: not JSON (Expecting property name"),
              "a_file": (a_file, "a_file.zarr: not a folder"),
              "empty": (empty, "empty.zarr: no zarr.json, not a Zarr v3 store"),
              "foreign": (foreign, "foreign.zarr: not an xstars store (its root attributes have no 'xstars' entry)")}
    for name, version, said in (("older", None, "no layout version (written before xstars recorded one)"),
                                ("newer", LAYOUT_VERSION + 1, f"layout version {LAYOUT_VERSION + 1}")):
        copy = folder / f"{name}.zarr"
        shutil.copytree(good, copy)
        meta = json.loads((copy / "zarr.json").read_text())
        if version is None:
            del meta["attributes"]["xstars"]["layout_version"]
        else:
            meta["attributes"]["xstars"]["layout_version"] = version
        (copy / "zarr.json").write_text(json.dumps(meta))
        stores[name] = (copy, f"{name}.zarr: store has {said}, this xstars reads layout version {LAYOUT_VERSION}")
    return stores


def test_open_store_names_the_path_and_what_is_wrong(tmp_path: Path, good: Path) -> None:
    assert open_store(good).attrs["xstars"]["layout_version"] == LAYOUT_VERSION
    for name, (path, said) in bad_stores(tmp_path, good).items():
        with pytest.raises(DataError) as err:
            open_store(path)
        assert said in str(err.value), name
        assert "\n" not in str(err.value), name


def _one_error_line(capsys: pytest.CaptureFixture[str], status: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_every_command_that_reads_a_store_says_what_is_wrong_in_one_line(
        tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # commands read ./config.yaml
    manifest = tmp_path / "manifest.parquet"  # verify reads the store first: the manifest need not exist
    commands = {
        "pretrain": lambda store: ["pretrain", "run", "--store", str(store), "--run", "dino_only",
                                   "--out-dir", str(tmp_path / "run")],
        "evaluate": lambda store: ["evaluate", "model", "--store", str(store), "--model", "random",
                                   "--runs-dir", str(tmp_path), "--out", str(tmp_path / "random.json")],
        "export": lambda store: ["export", "msc-france", str(store), str(tmp_path / "export")],
        "verify": lambda store: ["build", "verify", "--manifest", str(manifest), "--store", str(store),
                                 "--out", str(tmp_path / "verify.json")],
    }
    stores = bad_stores(tmp_path, good)
    for command, argv in commands.items():
        for name, (path, said) in stores.items():
            line = _one_error_line(capsys, main(argv(path)))
            assert said in line, (command, name, line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()


def test_init_given_to_a_run_that_is_not_continual_is_refused(
        tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    status = main(["pretrain", "run", "--store", str(good), "--run", "dino_only", "--out-dir", str(tmp_path / "run"),
                   "--init", str(tmp_path / "weights.safetensors")])
    line = _one_error_line(capsys, status)
    assert "--init" in line and "weights.safetensors" in line and "run 'dino_only' is not continual" in line
    assert "pretrain.runs.dino_only.mode is 'scratch'" in line
    assert not (tmp_path / "run").exists()


def test_the_dataset_refuses_a_bad_store_in_one_line(tmp_path: Path, good: Path) -> None:
    from xstars.torch_dataset import StoreDataset

    for name, (path, said) in bad_stores(tmp_path, good).items():
        with pytest.raises(DataError, match="^.*" + said.split(":")[0]) as err:
            StoreDataset(path)
        assert said in str(err.value), name


def test_sensors_and_roles_from_the_groups_or_from_the_root_attributes(tmp_path: Path) -> None:
    good = write_store(tmp_path / "dataset.zarr", samples=3, samples_per_shard=3)
    root = zarr.open_group(str(good), mode="r+")
    # A store built before stores recorded their sensors: the groups, by name; a group whose
    # data declares flag_values (class codes) holds labels, any other images.
    meta = dict(root.attrs["xstars"])
    meta.pop("sensors")
    root.attrs["xstars"] = meta
    assert store_sensors(open_store(good)) == {name: {"role": "labels" if name == "labels" else "image"}
                                               for name in ("ign", "l8", "labels", "s2")}
    del root["labels"]["data"].attrs["flag_values"]
    assert labels_sensor(open_store(good)) is None
    root["labels"]["data"].attrs["flag_values"] = [10, 50, 80]
    root = open_store(good)
    assert image_sensors(root) == ["ign", "l8", "s2"] and labels_sensor(root) == "labels"
    # A store that records its sensors (xstars.sensors) is read in that order, roles as recorded.
    recorded = {"s2": {"role": "image"}, "ign": {"role": "image"}, "labels": {"role": "labels"}}
    root = zarr.open_group(str(good), mode="r+")
    root.attrs["xstars"] = {**root.attrs["xstars"], "sensors": recorded}
    assert list(store_sensors(open_store(good))) == ["s2", "ign", "labels"]
    root.attrs["xstars"] = {**root.attrs["xstars"], "sensors": {"s2": {"role": "picture"}}}
    with pytest.raises(DataError, match="sensor 's2' has role 'picture', not one of"):
        store_sensors(open_store(good))
