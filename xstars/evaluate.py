"""Evaluate: downstream tasks on frozen features, to test the sensor-agnostic claim.

For one model (an exported backbone, or a random initialisation as the floor), every tile of
the store is embedded by every sensor at the model's input size (the whole footprint, through
its own normalisation). Then, with the labels of the store (``labels`` group: WorldCover
classes):

* cross-sensor retrieval (test split): a tile seen by sensor A must find itself among the
  tiles seen by sensor B; top-1 / top-5 for every ordered pair;
* tile classification: majority class (k-NN and linear probe) and multi-label presence
  (linear probe, mean average precision), per sensor;
* segmentation: a linear layer on the patch tokens, upsampled to the label grid (mIoU);
* label efficiency: the probes trained on fractions of the training tiles;
* cross-sensor transfer: a probe trained on sensor A's features, tested on sensor B's;
* public benchmarks in their published layouts (``evaluate.benchmarks``, :mod:`xstars.benchmarks`).

Every probe runs for each of ``probe_seeds`` (its initialisation and, below 100 %, its subset
of training tiles); the records keep the seed so that the report gives mean and spread.

This module is the driver (:func:`evaluate_model`, :func:`random_model`), the labels of the
store's tiles and the report tables; the features are computed by :mod:`xstars.features`, the
probes and metrics are :mod:`xstars.probes`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xstars.data import sensor_infos, usable_samples
from xstars.errors import DataError
from xstars.features import embed, footprint_views, model_infos
from xstars.layout import labels_sensor, open_store
from xstars.model import ViT
from xstars.probes import (
    NO_LABEL,
    finetune_accuracy,
    fit_linear,
    fit_segmentation,
    knn_accuracy,
    mean_average_precision,
    mean_iou,
    retrieval,
    standardise,
    subset,
)

log = logging.getLogger(__name__)


# ================================================================================== labels


@dataclass
class Labels:
    """Targets of some tiles, from the store's label maps."""

    maps: torch.Tensor  # [n, H, W] class index, NO_LABEL where unknown
    majority: torch.Tensor  # [n] class index of the most frequent class
    presence: torch.Tensor  # [n, C] 1 where a class covers at least the threshold
    classes: list[int]  # WorldCover codes, in index order


def read_labels(store: Path | str, samples: Sequence[int], classes: Sequence[int],
                presence_threshold: float = 0.05) -> Labels:
    group = _label_group(store)
    codes = np.stack([group["data"][int(i)][0] for i in samples])
    valid = np.stack([group["valid"][int(i)] for i in samples]).astype(bool)
    lookup = np.full(256, NO_LABEL, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    maps = lookup[codes]
    maps[~valid] = NO_LABEL
    counts = np.stack([np.bincount(m[m != NO_LABEL], minlength=len(classes)) for m in maps])
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return Labels(torch.from_numpy(maps), torch.from_numpy(counts.argmax(axis=1)),
                  torch.from_numpy((fractions >= presence_threshold).astype(np.float32)), list(classes))


def store_classes(store: Path | str, samples: Sequence[int]) -> list[int]:
    """The label codes that occur in ``samples`` (sorted): the classes of every task."""
    group = _label_group(store)
    present: set[int] = set()
    for i in samples:
        values = group["data"][int(i)][0][group["valid"][int(i)].astype(bool)]
        present |= set(np.unique(values).tolist())
    present.discard(0)
    if not present:
        raise DataError(f"{store}: no labelled pixel in the evaluation tiles")
    return sorted(present)


def _label_group(store: Path | str):
    root = open_store(store)
    name = labels_sensor(root)
    if name is None:
        raise DataError(f"{store}: no label group (no sensor with role `labels`)")
    return root[name]


# ================================================================================ evaluate


def evaluate_model(backbone: ViT, description: Mapping[str, Any], store: Path | str, settings: Mapping[str, Any],
                   name: str, device: torch.device | None = None) -> dict[str, Any]:
    """Every task of ``settings`` (the ``evaluate`` config) for one model; JSON-ready records."""
    sensors = list(settings["sensors"])
    train_ids = usable_samples(store, sensors, settings["train_splits"])
    test_ids = usable_samples(store, sensors, settings["test_splits"])
    if len(train_ids) == 0 or len(test_ids) < 2:
        raise DataError(f"{store}: {len(train_ids)} training and {len(test_ids)} test tiles usable by {sensors}: "
                        "not enough to evaluate")
    infos = model_infos(store, description, sensors)
    px = int(settings["input_px"] or description["architecture"]["img_size"])
    backbone = backbone.to(device or torch.device("cpu")).eval()
    train = embed(backbone, store, infos, train_ids, px, settings["batch_size"], device)
    test = embed(backbone, store, infos, test_ids, px, settings["batch_size"], device)
    # A store without labels (e.g. imported from the released MSC-France images) still measures
    # cross-sensor retrieval; the probes need label maps.
    labelled = labels_sensor(open_store(store)) is not None
    if labelled:
        classes = store_classes(store, np.concatenate([train_ids, test_ids]))
        train_y = read_labels(store, train_ids, classes, settings["presence_threshold"])
        test_y = read_labels(store, test_ids, classes, settings["presence_threshold"])
    else:
        classes = []
        log.info("%s has no label group: retrieval only (the probes need label maps)", store)
    kind = settings["feature"]
    records: list[dict[str, Any]] = []

    def record(task: str, metric: str, value: float, sensor: str, test_sensor: str, fraction: float | None,
               seed: int | None) -> None:
        records.append({"model": name, "task": task, "metric": metric, "value": round(float(value), 6),
                        "train_sensor": sensor, "test_sensor": test_sensor, "fraction": fraction, "seed": seed})

    examples = {}
    for a in sensors:
        for b in sensors:
            if a == b:
                continue
            scores, ranking = retrieval(test[a].tile_features(kind), test[b].tile_features(kind))
            for metric, value in scores.items():
                record("retrieval", metric, value, a, b, None, None)
            examples[f"{a}->{b}"] = ranking[: settings["examples"], :3].tolist()

    n_classes = len(classes)
    for seed in settings["probe_seeds"] if labelled else ():
        for fraction in settings["label_fractions"]:
            index = subset(len(train_ids), fraction, seed)
            for a in sensors:
                x_train, *x_tests = standardise(train[a].tile_features(kind)[index],
                                                *(test[b].tile_features(kind) for b in sensors))
                record("classification", "knn_accuracy",
                       knn_accuracy(train[a].tile_features(kind)[index], train_y.majority[index],
                                    test[a].tile_features(kind), test_y.majority, n_classes, settings["knn_k"]),
                       a, a, fraction, seed)
                probe = fit_linear(x_train, train_y.majority[index], n_classes, seed)
                presence = fit_linear(x_train, train_y.presence[index], n_classes, seed, multilabel=True)
                seg = fit_segmentation(train[a].patches[index], train_y.maps[index], n_classes, seed,
                                       settings["segmentation_epochs"])
                for b, x_test in zip(sensors, x_tests, strict=True):
                    if b != a and fraction != 1.0:
                        continue  # transfer at full labels only
                    with torch.no_grad():
                        accuracy = float((probe(x_test).argmax(dim=1) == test_y.majority).float().mean())
                        average_precision = mean_average_precision(presence(x_test), test_y.presence)
                    task = "classification" if b == a else "transfer"
                    record(task, "linear_accuracy", accuracy, a, b, fraction, seed)
                    record(task, "presence_map", average_precision, a, b, fraction, seed)
                    record("segmentation" if b == a else "transfer", "miou",
                           mean_iou(seg, test[b].patches, test_y.maps, n_classes), a, b, fraction, seed)
    if settings["finetune"]["enabled"] and labelled:
        tune = settings["finetune"]
        train_views = footprint_views(store, infos, train_ids, px)
        test_views = footprint_views(store, infos, test_ids, px)
        for a in sensors:
            accuracy = finetune_accuracy(backbone, a, train_views[a], train_y.majority, test_views[a], test_y.majority,
                                         n_classes, settings["probe_seeds"][0], tune["epochs"], tune["lr"],
                                         tune["batch_size"], device)
            record("finetune", "accuracy", accuracy, a, a, 1.0, settings["probe_seeds"][0])
    from xstars.benchmarks import evaluate_benchmark  # public benchmarks, beside the store's tasks

    benchmarks = []
    for spec in settings["benchmarks"]:
        found, info = evaluate_benchmark(backbone, description, spec, settings, store, name, device)
        records.extend(found)
        benchmarks.append(info)
    return {"model": name, "classes": classes, "train_tiles": len(train_ids), "test_tiles": len(test_ids),
            "test_ids": test_ids.tolist(), "input_px": px, "records": records, "retrieval_examples": examples,
            "benchmarks": benchmarks}


def random_model(store: Path | str, pretrain: Mapping[str, Any], sensors: Sequence[str], seed: int,
                 ) -> tuple[ViT, dict[str, Any]]:
    """The floor: the pretraining architecture, randomly initialised, fed like the others."""
    from xstars.config import run_bands

    infos = sensor_infos(store, sensors, run_bands({**pretrain, "sensors": list(sensors)}))
    torch.manual_seed(seed)
    model = pretrain["model"]
    backbone = ViT({s: len(i.bands) for s, i in infos.items()}, arch=model["arch"], patch_size=model["patch_size"],
                   img_size=pretrain["views"]["global_px"])
    description = {"architecture": {"img_size": backbone.img_size},
                   "sensors": {s: {"bands": list(i.bands), "mean": i.mean.tolist(), "std": i.std.tolist()}
                               for s, i in infos.items()}}
    return backbone.eval(), description


# ================================================================================== report


def summarise(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation and count over probe seeds, one row per everything else."""
    groups: dict[tuple, list[float]] = {}
    for result in results:
        for r in result["records"]:
            key = (r["model"], r["task"], r["metric"], r["train_sensor"], r["test_sensor"], r["fraction"])
            groups.setdefault(key, []).append(r["value"])
    rows = []
    for (model, task, metric, a, b, fraction), values in groups.items():
        values_array = np.asarray(values, dtype=float)
        rows.append({"model": model, "task": task, "metric": metric, "train_sensor": a, "test_sensor": b,
                     "fraction": fraction, "mean": round(float(np.nanmean(values_array)), 4),
                     "std": round(float(np.nanstd(values_array)), 4), "n": len(values)})
    return rows


def headline(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """One line per model: each metric averaged over sensors (pairs for retrieval and transfer),
    at 100 % labels, with the spread over probe seeds."""
    columns = {
        "retrieval top-1": ("retrieval", "top1", None),
        "retrieval top-5": ("retrieval", "top5", None),
        "k-NN acc.": ("classification", "knn_accuracy", 1.0),
        "linear acc.": ("classification", "linear_accuracy", 1.0),
        "presence mAP": ("classification", "presence_map", 1.0),
        "seg. mIoU": ("segmentation", "miou", 1.0),
        "transfer acc.": ("transfer", "linear_accuracy", 1.0),
        "transfer mIoU": ("transfer", "miou", 1.0),
    }
    table = []
    for model in models:
        line: dict[str, Any] = {"model": model}
        for column, (task, metric, fraction) in columns.items():
            chosen = [r for r in rows if r["model"] == model and r["task"] == task and r["metric"] == metric
                      and r["fraction"] == fraction]
            if chosen:
                line[column] = (float(np.mean([r["mean"] for r in chosen])), float(np.mean([r["std"] for r in chosen])))
        table.append(line)
    return table


def write_tables(results: Sequence[Mapping[str, Any]], csv_path: Path, markdown_path: Path,
                 seeds: Sequence[int]) -> list[dict[str, Any]]:
    import csv

    rows = summarise(results)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    models = [r["model"] for r in results]
    table = headline(rows, models)
    columns = [c for c in table[0] if c != "model"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for line in table:
        cells = [f"{line[c][0]:.3f} ± {line[c][1]:.3f}" if c in line else "" for c in columns]
        lines.append(f"| {line['model']} | " + " | ".join(cells) + " |")
    first = results[0]
    notes = [
        "",
        (f"Means over sensors (ordered sensor pairs for retrieval and transfer) at 100 % of the training labels; "
        f"± is the standard deviation over probe seeds {list(seeds)} (retrieval has no probe: ± 0). "
        f"{first['train_tiles']} training tiles, {first['test_tiles']} test tiles, classes {first['classes']}. "
        "Every value per sensor, pair, label fraction and seed is in the CSV."),
    ]
    from xstars.benchmarks import benchmark_lines

    markdown_path.write_text("\n".join(lines + notes + benchmark_lines(results)) + "\n")
    return table


def save(result: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
