"""Public benchmarks: each reader on its fake copy (written by xstars.demo.benchmarks in the
published layout), checked against the layout's documentation; band mapping by name; the
probes; the rows of results.md and the CSV; the error on a wrong folder; the config rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch

from tests.synthetic_store import write_store
from tests.test_evaluate import settings
from tests.test_pretrain import tiny_settings
from xstars import benchmarks as bm
from xstars import evaluate
from xstars.config import load_config
from xstars.demo.benchmarks import write_benchmarks
from xstars.errors import ConfigError, DataError
from xstars.model import ViT

ROOT = Path(__file__).resolve().parents[1]
#: The bands of the project's sensors (config.yaml): what a trained model's description lists.
S2_BANDS = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
IGN_BANDS = ["R", "G", "B", "NIR"]


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    paths = write_benchmarks(tmp_path_factory.mktemp("benchmarks"), seed=0)
    return {layout: Path(path) for layout, path in paths.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "dataset.zarr", samples=12, samples_per_shard=4)


def model(s2_bands=S2_BANDS, s2_gsd=10.0, ign_gsd=1.0) -> tuple[ViT, dict]:
    """A random ViT-Tiny with the project's s2 and ign patch embeddings, and its description."""
    torch.manual_seed(0)
    backbone = ViT({"s2": len(s2_bands), "ign": 4}, arch="vit_tiny", patch_size=16, img_size=32).eval()
    description = {"architecture": {"img_size": 32}, "sensors": {
        "s2": {"bands": list(s2_bands), "mean": [0.15] * len(s2_bands), "std": [0.1] * len(s2_bands), "gsd_m": s2_gsd},
        "ign": {"bands": IGN_BANDS, "mean": [0.4] * 4, "std": [0.2] * 4, "gsd_m": ign_gsd}}}
    return backbone, description


def with_benchmarks(entries: list[dict]) -> dict:
    """The project's config with these evaluate.benchmarks entries (validated, defaults filled)."""
    return load_config(ROOT / "config.yaml", {"evaluate": {"benchmarks": entries}})


def spec(name: str, layout: str, path: Path, sensor: str, **extra) -> dict:
    """One evaluate.benchmarks entry, validated (defaults filled) as the config would give it."""
    entry = {"name": name, "layout": layout, "path": str(path), "sensor": sensor, **extra}
    return with_benchmarks([entry])["evaluate"]["benchmarks"][0]


def probe_settings(**overrides) -> dict:
    return settings(label_fractions=[0.1, 1.0], segmentation_epochs=10, **overrides)


def mean_value(records, metric: str, fraction: float) -> float:
    return float(np.mean([r["value"] for r in records if r["metric"] == metric and r["fraction"] == fraction]))


def test_eurosat_ms_as_published(fakes, store: Path, tmp_path: Path) -> None:
    # EuroSAT_MS.zip: <Class>/<Class>_<n>.tif, 10 classes, 13 uint16 bands (B8A the 13th), 64 px
    # of 10 m in a UTM zone; the copy may be given by its parent folder.
    reader = bm.open_benchmark(spec("eurosat", "eurosat_ms", fakes["eurosat_ms"].parent, "s2"))
    assert reader.classes == bm.EUROSAT_CLASSES and len(reader.classes) == 10
    assert reader.bands[8] == "B09" and reader.bands[12] == "B8A" and "B10" in reader.bands
    assert len(reader.samples) == 40 and np.bincount([s.target for s in reader.samples]).tolist() == [4] * 10
    first = reader.samples[0]
    assert first.files[0].relative_to(fakes["eurosat_ms"]).as_posix() == "AnnualCrop/AnnualCrop_1.tif"
    with rasterio.open(first.files[0]) as src:
        assert (src.count, src.dtypes[0], src.shape, src.res) == (13, "uint16", (64, 64), (10.0, 10.0))
        assert src.crs.is_projected and str(src.crs.to_epsg()).startswith("326")  # UTM north
        raw = src.read()
    assert np.allclose(reader.read_image(first), raw * 1e-4)  # L1C reflectance x 10^4, no offset
    assert reader.fake and reader.gsd_m == 10.0 and {s.split for s in reader.samples} == {None}

    # No official split: a stratified draw per probe seed, one image of each class held out.
    train, test = bm.split_indices(reader.samples, spec("e", "eurosat_ms", fakes["eurosat_ms"], "s2"), 0,
                                   reader.task)
    assert len(test) == 10 and sorted(reader.samples[i].target for i in test.tolist()) == list(range(10))
    assert not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == 40
    assert not torch.equal(bm.split_indices(reader.samples, spec("e", "eurosat_ms", fakes["eurosat_ms"], "s2"), 1,
                                            reader.task)[1], test)
    # torchgeo's split lists (image names as *.jpg) are honoured when given.
    names = [s.id for s in reader.samples]
    (tmp_path / "train.txt").write_text("".join(f"{n}.jpg\n" for n in names[::2]))
    (tmp_path / "test.txt").write_text("".join(f"{n}.jpg\n" for n in names[1::2]))
    listed = bm.open_benchmark(spec("e", "eurosat_ms", fakes["eurosat_ms"], "s2", split_files={
        "train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}))
    assert [s.split for s in listed.samples[:4]] == ["train", "test", "train", "test"]

    # Bands matched by name: the model's 10 Sentinel-2 bands; L1C's B01, B09, B10 dropped.
    backbone, description = model()
    records, info = bm.evaluate_benchmark(backbone, description, spec("eurosat", "eurosat_ms", fakes["eurosat_ms"],
                                                                      "s2"), probe_settings(), store, "random")
    assert info["bands"] == S2_BANDS and info["dropped_bands"] == ["B01", "B09", "B10"]
    assert (info["gsd_m"], info["input_px"], info["train"], info["test"], info["fake"]) == (10.0, 64, 30, 10, True)
    assert {(r["metric"], r["fraction"], r["seed"]) for r in records} == {
        (m, f, s) for m in ("knn_accuracy", "linear_accuracy") for f in (0.1, 1.0) for s in (0, 1)}
    assert {r["task"] for r in records} == {"benchmark:eurosat (fake)"}
    assert mean_value(records, "linear_accuracy", 1.0) > 0.3  # 10 classes: chance is 0.1
    # The resolution: resampled to the sensor's gsd_m, or kept.
    coarse = model(s2_gsd=20.0)
    assert bm.evaluate_benchmark(*coarse, spec("e", "eurosat_ms", fakes["eurosat_ms"], "s2"), probe_settings(),
                                 store, "m")[1]["input_px"] == 32
    assert bm.evaluate_benchmark(*coarse, spec("e", "eurosat_ms", fakes["eurosat_ms"], "s2", resolution="native"),
                                 probe_settings(), store, "m")[1]["input_px"] == 64


def test_bigearthnet_v1_as_published(fakes, store: Path) -> None:
    # BigEarthNet-v1.0/<patch>/<patch>_<band>.tif at 10/20/60 m, <patch>_labels_metadata.json with
    # CORINE level-3 names, the official train/val/test CSVs beside it.
    root = fakes["bigearthnet_v1"]
    patches = sorted(p.name for p in (root / "BigEarthNet-v1.0").iterdir())
    assert len(patches) == 17 and all(p.startswith("S2") and "_MSIL2A_" in p for p in patches)
    folder = root / "BigEarthNet-v1.0" / patches[0]
    for band, px in (("B02", 120), ("B05", 60), ("B01", 20)):
        with rasterio.open(folder / f"{patches[0]}_{band}.tif") as src:
            assert (src.shape, src.dtypes[0], src.crs.to_epsg()) == ((px, px), "uint16", 32633)
    metadata = json.loads((folder / f"{patches[0]}_labels_metadata.json").read_text())
    assert set(metadata) == {"labels", "coordinates", "projection", "tile_source", "acquisition_date"}

    reader = bm.open_benchmark(spec("ben", "bigearthnet_v1", root, "s2"))
    assert reader.classes == bm.BIGEARTHNET_CLASSES and len(reader.classes) == 19
    assert reader.bands == bm.BIGEARTHNET_BANDS and "B10" not in reader.bands
    # 16 labelled patches; the one with only "Green urban areas" has no 19-class label.
    splits = [s.split for s in reader.samples]
    assert len(reader.samples) == 16 and (splits.count("train"), splits.count("val"), splits.count("test")) == (10, 2, 4)
    # Labels: the 43 CORINE names mapped to the 19 classes; "Road and rail networks" has no counterpart.
    for sample in reader.samples:
        names = json.loads((root / "BigEarthNet-v1.0" / sample.id / f"{sample.id}_labels_metadata.json").read_text())
        assert sample.target == tuple(sorted({bm.BIGEARTHNET_CLASSES.index(bm.CLC43_TO_19[n])
                                              for n in names["labels"] if n in bm.CLC43_TO_19}))
    assert "Road and rail networks and associated land" in metadata["labels"] and by_id_target(reader, patches[0])
    assert reader.read_image(reader.samples[0]).shape == (12, 120, 120)  # every band on the 10 m grid

    backbone, description = model()
    records, info = bm.evaluate_benchmark(backbone, description, spec("ben", "bigearthnet_v1", root, "s2",
                                                                      train_splits=["train", "val"]),
                                          probe_settings(), store, "random")
    assert (info["split"], info["train"], info["test"], info["input_px"]) == ("official", 12, 4, 128)
    assert info["dropped_bands"] == ["B01", "B09"]
    assert {r["metric"] for r in records} == {"map"} and all(0 <= r["value"] <= 1 for r in records)
    # A model band the benchmark lacks refuses the mapping, naming it.
    with pytest.raises(DataError, match=r"need \['B10'\], which the benchmark lacks"):
        bm.evaluate_benchmark(*model(s2_bands=["B02", "B03", "B04", "B10"]), spec("ben", "bigearthnet_v1", root, "s2"),
                              probe_settings(), store, "m")


def by_id_target(reader, sample_id: str) -> tuple:
    return next(s.target for s in reader.samples if s.id == sample_id)


def test_bigearthnet_v2_as_published(fakes, store: Path) -> None:
    # reBEN: metadata.parquet beside BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_<band>.tif.
    root = fakes["bigearthnet_v2"]
    table = pq.read_table(root / "metadata.parquet")
    assert table.column_names == ["patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                                  "contains_seasonal_snow", "contains_cloud_or_shadow"]
    assert set(table.column("split").to_pylist()) == {"train", "validation", "test"}
    reader = bm.open_benchmark(spec("ben2", "bigearthnet_v2", root, "s2"))
    sample = reader.samples[0]
    tile = sample.id.rsplit("_", 2)[0]
    assert "_N9999_" in sample.id and sample.files[1] == root / "BigEarthNet-S2" / tile / sample.id / f"{sample.id}_B02.tif"
    assert {s.split for s in reader.samples} == {"train", "val", "test"}  # "validation" named val
    labels = dict(zip(table.column("patch_id").to_pylist(), table.column("labels").to_pylist(), strict=True))
    assert [reader.classes[k] for k in sample.target] == sorted(labels[sample.id], key=bm.BIGEARTHNET_CLASSES.index)
    with rasterio.open(sample.files[1]) as src:
        raw = src.read(1)
    assert np.allclose(reader.read_image(sample)[1], raw * 1e-4)  # N9999: no offset
    # The baseline offset where a product name tells it.
    assert bm.s2_offset_from_name("S2A_MSIL2A_20220613T101031_N0400_R022_T33UUP_26_57") == -1000
    assert bm.s2_offset_from_name("S2A_MSIL2A_20170613T101031_N0205_R022_T33UUP") == 0
    assert bm.s2_offset_from_name(sample.id) == 0
    records, info = bm.evaluate_benchmark(*model(), spec("ben2", "bigearthnet_v2", root, "s2"), probe_settings(),
                                          store, "random")
    assert (info["train"], info["test"]) == (10, 4) and {r["metric"] for r in records} == {"map"}


def test_flair_as_published(fakes, store: Path) -> None:
    # FLAIR #1: flair_aerial_train / flair_labels_train and flair_1_aerial_test / flair_1_labels_test,
    # <domain>/<zone>/img/IMG_<n>.tif (R G B NIR elevation, uint8, 512 px of 0.2 m, Lambert-93)
    # with <domain>/<zone>/msk/MSK_<n>.tif (values 1..19).
    root = fakes["flair"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "flair_1_aerial_test", "flair_1_labels_test", "flair_aerial_train", "flair_labels_train"]
    reader = bm.open_benchmark(spec("flair", "flair", root, "ign"))
    sample = reader.samples[0]
    rel = sample.files[0].relative_to(root / "flair_aerial_train").parts
    assert rel[0].startswith("D") and rel[1].startswith("Z") and rel[2] == "img" and rel[3].startswith("IMG_")
    assert sample.files[1] == root / "flair_labels_train" / rel[0] / rel[1] / "msk" / rel[3].replace("IMG_", "MSK_")
    with rasterio.open(sample.files[0]) as src:
        assert (src.count, src.dtypes[0], src.shape, src.res, src.crs.to_epsg()) == (5, "uint8", (512, 512),
                                                                                  (0.2, 0.2), 2154)
    assert reader.bands == ("R", "G", "B", "NIR", "elevation") and len(reader.classes) == 13
    splits = [s.split for s in reader.samples]
    assert (splits.count("train"), splits.count("test")) == (4, 2)
    # The challenge's 13 classes: values above 12 (swimming pool 13, greenhouse 18...) are "other".
    values = np.concatenate([np.unique(bm._read_mask_values(s.files[1])) for s in reader.samples])
    assert {13, 18} <= set(values.tolist()) and set(values.tolist()) <= set(range(1, 20))
    pooled = next(s for s in reader.samples if 13 in bm._read_mask_values(s.files[1]))
    raw, mapped = bm._read_mask_values(pooled.files[1]), reader.read_mask(pooled)
    assert (mapped[raw == 13] == 12).all() and (mapped[raw == 1] == 0).all()
    assert np.allclose(reader.read_image(sample)[0], rasterio.open(sample.files[0]).read(1) / 255)

    records, info = bm.evaluate_benchmark(*model(), spec("flair", "flair", root, "ign"), probe_settings(), store,
                                          "random")
    # 102.4 m patches at the sensor's 1 m: 102 px, rounded to whole 16-px patches.
    assert info["dropped_bands"] == ["elevation"] and (info["input_px"], info["native_px"]) == (96, 512)
    assert {(r["metric"], r["fraction"]) for r in records} == {("miou", 0.1), ("miou", 1.0)}
    assert all(0 < r["value"] <= 1 for r in records)


def test_generic_class_folders_and_image_mask_pairs(fakes, store: Path, tmp_path: Path) -> None:
    folders = bm.open_benchmark(spec("f", "class_folders", fakes["class_folders"], "s2"))
    assert folders.classes == ("crop", "forest", "urban") and folders.bands == ("B02", "B03", "B04", "B08")
    records, info = bm.evaluate_benchmark(*model(s2_bands=["B02", "B03", "B04", "B08"]),
                                          spec("f", "class_folders", fakes["class_folders"], "s2"), probe_settings(),
                                          store, "random")
    assert info["split"].startswith("random") and mean_value(records, "knn_accuracy", 1.0) > 0.5  # chance 1/3

    pairs = bm.open_benchmark(spec("p", "image_mask_pairs", fakes["image_mask_pairs"], "ign", ignore_values=[0]))
    assert pairs.classes == ("1", "2", "3", "4") and pairs.bands == ("R", "G", "B", "NIR")
    assert {s.split for s in pairs.samples} == {"train", "test"}  # its train/ and test/ folders
    mask = pairs.read_mask(pairs.samples[0])
    assert (mask[:4] == bm.NO_LABEL).all() and set(np.unique(mask[4:]).tolist()) <= {0, 1, 2, 3}
    chosen = bm.open_benchmark(spec("p", "image_mask_pairs", fakes["image_mask_pairs"], "ign", classes=[4, 2]))
    assert chosen.classes == ("4", "2") and set(np.unique(chosen.read_mask(chosen.samples[0])).tolist()) <= {0, 1, 255}
    records, info = bm.evaluate_benchmark(*model(), spec("p", "image_mask_pairs", fakes["image_mask_pairs"], "ign",
                                                         scale_factor=1 / 255, ignore_values=[0]),
                                          probe_settings(), store, "random")
    assert (info["train"], info["test"], info["split"]) == (6, 3, "official") and records

    # A file that does not name its bands needs bands in the config.
    (tmp_path / "one").mkdir()
    with rasterio.open(tmp_path / "one" / "a.tif", "w", driver="GTiff", width=8, height=8, count=2, dtype="uint16",
                       crs="EPSG:32631", transform=rasterio.transform.from_origin(0, 80, 10, 10)) as dst:
        dst.write(np.ones((2, 8, 8), dtype="uint16"))
    with pytest.raises(ConfigError, match=r"does not name its bands .*evaluate.benchmarks\[\].bands"):
        bm.open_benchmark(spec("g", "class_folders", tmp_path, "s2"))


@pytest.mark.parametrize(("layout", "other", "says"), [
    ("eurosat_ms", "flair", r"no class folder; expected EuroSAT \(multispectral\): the class folders AnnualCrop"),
    ("bigearthnet_v1", "eurosat_ms", r"no patch folder .*expected BigEarthNet-S2 v1.0: BigEarthNet-v1.0/<patch>"),
    ("bigearthnet_v2", "bigearthnet_v1", r"has no metadata.parquet and no BigEarthNet-S2; expected BigEarthNet v2.0 \(reBEN\)"),
    ("flair", "class_folders", r"no \*aerial_train folder .*expected FLAIR #1 / #2 aerial: the unpacked"),
    ("image_mask_pairs", "eurosat_ms", r"no images/\*.tif .*expected image/mask pairs"),
])
def test_a_wrong_folder_names_the_expected_layout(fakes, layout: str, other: str, says: str) -> None:
    with pytest.raises(DataError, match=r"evaluate.benchmarks b \(layout " + layout + r"\): .*" + says):
        bm.open_benchmark(spec("b", layout, fakes[other], "s2"))
    with pytest.raises(DataError, match=r"/nowhere is not a folder; expected"):
        bm.open_benchmark(spec("b", layout, Path("/nowhere"), "s2"))


def test_band_mapping_resolution_and_masks() -> None:
    index, dropped = bm.band_mapping(bm.EUROSAT_BANDS, ["B04", "B03", "B02", "B8A"], "x")
    assert [bm.EUROSAT_BANDS[i] for i in index] == ["B04", "B03", "B02", "B8A"] and index[-1] == 12
    assert "B10" in dropped and "B04" not in dropped
    with pytest.raises(DataError, match=r"need \['NIR', 'SWIR'\], which the benchmark lacks"):
        bm.band_mapping(("R", "G", "B"), ["R", "NIR", "SWIR"], "x")
    assert bm.input_px(512, 0.2, 1.0, 16) == 96 and bm.input_px(64, 10, 10, 16) == 64
    assert bm.input_px(120, 10, None, 16) == 128 and bm.input_px(50, 20, 10, 16) == 96
    assert bm.input_px(64, 10, 100, 16) == 16  # at least one patch
    mask = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])
    assert bm.resample_mask(mask, 2, 3).tolist() == [[0, 1], [2, 255]]  # majority, unknown kept
    assert bm.resample_mask(mask, 8, 3).shape == (8, 8)


def test_rows_in_results_md_and_the_csv(fakes, store: Path, tmp_path: Path) -> None:
    backbone, description = evaluate.random_model(store, tiny_settings(), ["s2", "l8", "ign"], seed=0)
    chosen = [spec("eurosat", "eurosat_ms", fakes["eurosat_ms"], "s2"), spec("flair", "flair", fakes["flair"], "ign")]
    result = evaluate.evaluate_model(backbone, description, store, settings(label_fractions=[0.1, 1.0],
                                                                            benchmarks=chosen), "random")
    assert [b["name"] for b in result["benchmarks"]] == ["eurosat", "flair"]
    # The synthetic store's s2 has B02 B03 B04 B08 at 10 m, its ign 2 m: gsd from the store.
    assert result["benchmarks"][1]["input_px"] == 48 and result["benchmarks"][0]["bands"] == ["B02", "B03", "B04", "B08"]
    evaluate.write_tables([result], tmp_path / "results.csv", tmp_path / "results.md", [0, 1])
    markdown = (tmp_path / "results.md").read_text()
    assert "| eurosat (fake) | random | linear acc. |" in markdown and "| flair (fake) | random | mIoU |" in markdown
    assert "100 % labels | 10 % labels |" in markdown and "FAKE copy" in markdown and "dropped B01" in markdown
    with (tmp_path / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["task"].startswith("benchmark:")]
    assert {r["task"] for r in rows} == {"benchmark:eurosat (fake)", "benchmark:flair (fake)"}
    assert {(r["task"], r["metric"], r["fraction"]) for r in rows} >= {("benchmark:flair (fake)", "miou", "1.0")}


def test_benchmark_config_keys(tmp_path: Path) -> None:
    entry = {"name": "e", "layout": "eurosat_ms", "path": "/data/EuroSAT_MS", "sensor": "s2"}
    filled = with_benchmarks([entry])["evaluate"]["benchmarks"][0]
    assert (filled["resolution"], filled["test_fraction"], filled["max_per_split"]) == ("sensor_gsd", 0.2, 0)
    with pytest.raises(ConfigError, match=r"benchmarks.*bands.*fixes its bands, units and classes"):
        with_benchmarks([{**entry, "bands": ["B02"]}])
    with pytest.raises(ConfigError, match=r"'evaluate\.benchmarks\[0\]\.sensor': 'modis' is not an image sensor"):
        with_benchmarks([{**entry, "sensor": "modis"}])
    with pytest.raises(ConfigError, match=r"'e' names two benchmarks"):
        with_benchmarks([entry, entry])
    with pytest.raises(ConfigError, match=r"layout"):
        with_benchmarks([{**entry, "layout": "eurosat"}])
    # The demo world's copies are generated under demo.root.
    demo = load_config(ROOT / "config.yaml", {"world": "demo", "demo": {"root": str(tmp_path / "w")}})
    paths = [b["path"] for b in demo["evaluate"]["benchmarks"]]
    assert paths and all(p.startswith(str(tmp_path / "w") + "/benchmarks/") for p in paths)


def test_the_demo_command_writes_the_copies(tmp_path: Path) -> None:
    from xstars.cli import main

    assert main(["demo", "benchmarks", "--out", str(tmp_path), "--layouts", "class_folders"]) == 0
    listed = json.loads((tmp_path / "benchmarks.json").read_text())
    assert list(listed) == ["class_folders"] and (Path(listed["class_folders"]) / bm.FAKE_MARKER).is_file()
    assert main(["demo", "benchmarks", "--out", str(tmp_path), "--layouts", "imagenet"]) == 2
    # A rerun replaces the copy whole; a folder that is not a fake copy is never overwritten.
    assert main(["demo", "benchmarks", "--out", str(tmp_path), "--layouts", "class_folders"]) == 0
    (tmp_path / "mine" / "flair").mkdir(parents=True)
    with pytest.raises(DataError, match=r"flair exists and is not a fake copy"):
        write_benchmarks(tmp_path / "mine", layouts=["flair"])
