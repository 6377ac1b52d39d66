"""Evaluation: the metrics on cases with known answers, and every task end to end on a store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.synthetic_store import SENSORS, write_store
from tests.test_pretrain import tiny_settings
from xstars import evaluate, figures, probes, train
from xstars.config import load_config, validate
from xstars.errors import DataError
from xstars.model import load_exported

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "dataset.zarr", samples=12, samples_per_shard=4)


def settings(**overrides) -> dict:
    config = load_config(ROOT / "config.yaml")
    return config["evaluate"] | {"sensors": list(SENSORS), "probe_seeds": [0, 1], "label_fractions": [0.5, 1.0], "segmentation_epochs": 5,
                                 "input_px": 32} | overrides


def test_metrics_on_known_answers() -> None:
    features = torch.eye(4)
    assert probes.retrieval(features, features)[0] == {"top1": 1.0, "top5": 1.0}
    shifted = torch.roll(features, 1, dims=0)  # every tile finds its neighbour first
    scores, ranking = probes.retrieval(features, shifted)
    assert scores["top1"] == 0.0 and ranking[0, 0] == 1
    labels = torch.tensor([0, 0, 1, 1])
    assert probes.knn_accuracy(features + 0.01, labels, features, labels, classes=2, k=1) == 1.0
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert probes.mean_average_precision(targets * 2 - 1, targets) == 1.0
    assert probes.mean_average_precision(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]), targets) < 1.0
    head = torch.nn.Conv2d(2, 2, 1, bias=False)
    head.weight.data = torch.eye(2)[:, :, None, None]
    maps = torch.tensor([[[0, 1], [1, 0]]])
    patches = torch.nn.functional.one_hot(maps, 2).float()  # [1, 2, 2, 2]: the class as a feature
    assert probes.mean_iou(head, patches, maps, 2) == 1.0
    maps_with_hole = maps.clone()
    maps_with_hole[0, 0, 0] = probes.NO_LABEL
    assert probes.mean_iou(head, patches, maps_with_hole, 2) == 1.0  # unknown pixels are ignored


def test_label_subsets_are_seeded_and_never_empty() -> None:
    assert len(probes.subset(50, 0.01, 0)) == 1
    assert torch.equal(probes.subset(50, 0.1, 3), probes.subset(50, 0.1, 3))
    assert not torch.equal(probes.subset(50, 0.1, 3), probes.subset(50, 0.1, 4))


def test_every_task_for_a_random_and_a_trained_model(store: Path, tmp_path: Path) -> None:
    random_backbone, description = evaluate.random_model(store, tiny_settings(), ["s2", "l8", "ign"], seed=0)
    results = [evaluate.evaluate_model(random_backbone, description, store, settings(), "random")]
    train.pretrain(store, tiny_settings(optim={"epochs": 1}), tmp_path / "run", seed=0, progress=False)
    backbone, description = load_exported(tmp_path / "run" / "backbone.safetensors")
    results.append(evaluate.evaluate_model(backbone, description, store, settings(), "xstars"))
    records = results[1]["records"]
    tasks = {(r["task"], r["metric"]) for r in records}
    assert tasks == {("retrieval", "top1"), ("retrieval", "top5"), ("classification", "knn_accuracy"),
                     ("classification", "linear_accuracy"), ("classification", "presence_map"),
                     ("segmentation", "miou"), ("transfer", "linear_accuracy"), ("transfer", "presence_map"),
                     ("transfer", "miou")}
    pairs = {(r["train_sensor"], r["test_sensor"]) for r in records if r["task"] == "retrieval"}
    assert len(pairs) == 6  # every ordered pair of the three sensors
    transfer = {(r["train_sensor"], r["test_sensor"], r["fraction"]) for r in records if r["task"] == "transfer"}
    assert len(transfer) == 6 and {f for *_, f in transfer} == {1.0}
    seeds = {r["seed"] for r in records if r["task"] == "segmentation"}
    assert seeds == {0, 1}
    assert all(0.0 <= r["value"] <= 1.0 for r in records)
    assert results[1]["classes"] == [10, 30, 50, 80] and results[1]["test_tiles"] == 4

    table = evaluate.write_tables(results, tmp_path / "results.csv", tmp_path / "results.md", [0, 1])
    assert [line["model"] for line in table] == ["random", "xstars"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| random |" in markdown and "retrieval top-1" in markdown and "probe seeds [0, 1]" in markdown
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["model"] for row in rows} == {"random", "xstars"} and all(row["n"] for row in rows)
    figures.plot_label_efficiency(results, tmp_path / "curves.png")
    figures.plot_retrieval_examples(results, store, tmp_path / "examples.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "examples.png").stat().st_size > 10_000
    json.dumps(results)  # what the rule writes


def test_a_model_without_the_sensor_is_refused(store: Path, tmp_path: Path) -> None:
    backbone, description = evaluate.random_model(store, tiny_settings(), ["s2"], seed=0)
    with pytest.raises(Exception, match=r"not trained on 'l8'"):
        evaluate.evaluate_model(backbone, description, store, settings(), "s2-only")


def test_finetuning_and_a_benchmark_folder_of_classes(store: Path, tmp_path: Path) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from xstars.benchmarks import evaluate_benchmark

    # A folder of two classes of 4-band uint16 GeoTIFFs (reflectance x 10^4), bright and dark,
    # written and read through rasterio.
    for k, (name, level) in enumerate((("Forest", 600), ("Industrial", 2400))):
        (tmp_path / "bench" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.random.default_rng([k, i]).normal(level, 150, size=(4, 16, 16)).clip(0).astype("uint16")
            with rasterio.open(tmp_path / "bench" / name / f"{name}_{i}.tif", "w", driver="GTiff", width=16, height=16,
                               count=4, dtype="uint16", crs="EPSG:32631", transform=from_origin(0, 160, 10, 10)) as dst:
                dst.write(pixels)
    backbone, description = evaluate.random_model(store, tiny_settings(), ["s2", "l8", "ign"], seed=0)
    benchmarks = validate({"evaluate": {"benchmarks": [
        {"name": "bench", "layout": "class_folders", "path": str(tmp_path / "bench"), "sensor": "s2",
         "bands": ["B02", "B03", "B04", "B08"]}]}}, sections=["evaluate"])["evaluate"]["benchmarks"]
    result = evaluate.evaluate_model(backbone, description, store, settings(
        label_fractions=[1.0], benchmarks=benchmarks, finetune={"enabled": True, "epochs": 1, "lr": 1e-4,
                                                                "batch_size": 4}), "random")
    tuned = [r for r in result["records"] if r["task"] == "finetune"]
    assert {r["train_sensor"] for r in tuned} == {"s2", "l8", "ign"} and all(0 <= r["value"] <= 1 for r in tuned)
    bench = [r for r in result["records"] if r["task"] == "benchmark:bench"]
    assert {(r["metric"], r["seed"]) for r in bench} == {(m, s) for m in ("knn_accuracy", "linear_accuracy")
                                                         for s in (0, 1)}
    # Bright against dark tiles: even random features separate them.
    assert min(r["value"] for r in bench) >= 0.75
    info = result["benchmarks"][0]
    assert info["layout"] == "class_folders" and info["fake"] is False and info["dropped_bands"] == []
    assert (info["train"], info["test"], info["input_px"], info["gsd_m"]) == (16, 4, 16, 10.0)
    with pytest.raises(DataError, match=r"4 bands, evaluate.benchmarks bench.bands names 3"):
        evaluate_benchmark(backbone, description, {**benchmarks[0], "bands": ["B02", "B03", "B04"]},
                           settings(), store, "random")
