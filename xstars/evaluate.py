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
import torch.nn.functional as F

from xstars.data import (
    SensorInfo,
    StoreReader,
    footprint_box,
    resample_box,
    sensor_infos,
    usable_samples,
)
from xstars.errors import DataError
from xstars.layout import labels_sensor, open_store
from xstars.model import ViT

log = logging.getLogger(__name__)

NO_LABEL = 255  # label pixels without a class (no data), ignored by every metric


# ================================================================================ features


@dataclass
class Embedded:
    """Frozen features of some tiles by one sensor."""

    cls: torch.Tensor  # [n, D]
    patches: torch.Tensor  # [n, h, w, D]

    def tile_features(self, kind: str = "cls_mean") -> torch.Tensor:
        """One vector per tile: CLS, mean of patch tokens, or both (each L2-normalised)."""
        mean = self.patches.flatten(1, 2).mean(dim=1)
        parts = {"cls": [self.cls], "mean": [mean], "cls_mean": [self.cls, mean]}[kind]
        return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


def model_infos(store: Path | str, description: Mapping[str, Any], sensors: Sequence[str]) -> dict[str, SensorInfo]:
    """How the model reads each sensor (its bands and normalisation), located in the store."""
    infos = {}
    for sensor in sensors:
        if sensor not in description["sensors"]:
            raise DataError(f"the model was not trained on {sensor!r} (it knows {sorted(description['sensors'])})")
        wanted = description["sensors"][sensor]
        store_info = sensor_infos(store, [sensor], {sensor: wanted["bands"]})[sensor]
        infos[sensor] = SensorInfo(sensor, tuple(wanted["bands"]), store_info.band_index,
                                   np.asarray(wanted["mean"], dtype=np.float32),
                                   np.asarray(wanted["std"], dtype=np.float32), store_info.scale, store_info.tile_px)
    return infos


def footprint_views(store: Path | str, infos: Mapping[str, SensorInfo], samples: Sequence[int],
                    px: int) -> dict[str, torch.Tensor]:
    """Whole footprints of ``samples`` as ``px``-pixel normalised views, per sensor ``[n, C, px, px]``."""
    reader = StoreReader(store, infos)
    per_shard = reader.samples_per_shard
    views: dict[str, list[torch.Tensor]] = {s: [] for s in infos}
    by_shard: dict[int, list[int]] = {}
    for i in samples:
        by_shard.setdefault(int(i) // per_shard, []).append(int(i))
    for chunk in by_shard.values():  # one read per shard
        tiles = reader.read(min(chunk), max(chunk) + 1)
        for i in chunk:
            for sensor, (image, _, transform) in tiles[i].items():
                views[sensor].append(resample_box(image, transform, footprint_box(transform, image.shape[-1]), px))
    return {sensor: torch.stack(images) for sensor, images in views.items()}


@torch.no_grad()
def embed_views(backbone: ViT, images: torch.Tensor, sensor: str, batch_size: int = 64,
                device: torch.device | None = None) -> Embedded:
    device = device or next(backbone.parameters()).device
    grid = images.shape[-1] // backbone.patch_size
    cls, patches = [], []
    for start in range(0, len(images), batch_size):
        tokens = backbone(images[start:start + batch_size].to(device), sensor).float().cpu()
        cls.append(tokens[:, 0])
        patches.append(tokens[:, 1:].reshape(-1, grid, grid, tokens.shape[-1]))
    return Embedded(torch.cat(cls), torch.cat(patches))


def embed(backbone: ViT, store: Path | str, infos: Mapping[str, SensorInfo], samples: Sequence[int], px: int,
          batch_size: int = 64, device: torch.device | None = None) -> dict[str, Embedded]:
    """Features of ``samples`` by every sensor of ``infos`` (whole footprints at ``px`` pixels)."""
    views = footprint_views(store, infos, samples, px)
    return {sensor: embed_views(backbone, images, sensor, batch_size, device) for sensor, images in views.items()}


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


# ================================================================================== probes


def subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """``fraction`` of ``n`` training tiles (at least one), drawn by ``seed``."""
    size = max(1, round(fraction * n))
    return torch.from_numpy(np.sort(np.random.default_rng([seed, 17]).permutation(n)[:size]))


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                 classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN classifier on cosine similarity."""
    sims = F.normalize(test, dim=-1) @ F.normalize(train, dim=-1).T
    k = min(k, train.shape[0])
    top, index = sims.topk(k, dim=1)
    votes = torch.zeros(test.shape[0], classes).scatter_add_(1, train_y[index], (top / temperature).exp())
    return float((votes.argmax(dim=1) == test_y).float().mean())


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False).clamp(min=1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear(x: torch.Tensor, y: torch.Tensor, outputs: int, seed: int, multilabel: bool = False,
               weight_decay: float = 1e-3, iterations: int = 100) -> torch.nn.Linear:
    """A linear probe, full batch, L-BFGS (deterministic given the seed)."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], outputs)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = probe(x)
        loss = (F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y))
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes with at least one positive of the average precision."""
    aps = []
    for c in range(targets.shape[1]):
        positives = targets[:, c].sum()
        if positives == 0:
            continue
        order = scores[:, c].argsort(descending=True)
        hits = targets[order, c]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / positives))
    return float(np.mean(aps)) if aps else float("nan")


def fit_segmentation(patches: torch.Tensor, maps: torch.Tensor, classes: int, seed: int, epochs: int = 60,
                     lr: float = 1e-2, batch_size: int = 64) -> torch.nn.Conv2d:
    """A linear layer on patch tokens (1x1 convolution), logits upsampled to the label grid."""
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(patches.shape[-1], classes, kernel_size=1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(patches), generator=generator).split(batch_size):
            logits = segment(head, patches[index], maps.shape[-2:])
            loss = F.cross_entropy(logits, maps[index], ignore_index=NO_LABEL)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head


def segment(head: torch.nn.Conv2d, patches: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    logits = head(patches.permute(0, 3, 1, 2))
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def mean_iou(head: torch.nn.Conv2d, patches: torch.Tensor, maps: torch.Tensor, classes: int) -> float:
    """mIoU over the classes present in the reference maps."""
    with torch.no_grad():
        predicted = segment(head, patches, maps.shape[-2:]).argmax(dim=1)
    keep = maps != NO_LABEL
    confusion = torch.bincount(maps[keep] * classes + predicted[keep], minlength=classes * classes)
    confusion = confusion.reshape(classes, classes).double()
    present = confusion.sum(dim=1) > 0
    iou = confusion.diag() / (confusion.sum(dim=0) + confusion.sum(dim=1) - confusion.diag()).clamp(min=1)
    return float(iou[present].mean())


def retrieval(query: torch.Tensor, gallery: torch.Tensor, top: Sequence[int] = (1, 5)) -> tuple[dict, torch.Tensor]:
    """Tile i by one sensor must find tile i by the other: top-k accuracies, and the ranking."""
    sims = F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).T
    ranking = sims.argsort(dim=1, descending=True)
    truth = torch.arange(len(query))[:, None]
    return {f"top{k}": float((ranking[:, :k] == truth).any(dim=1).float().mean()) for k in top}, ranking


def finetune_accuracy(backbone: ViT, sensor: str, train_x: torch.Tensor, train_y: torch.Tensor,
                      test_x: torch.Tensor, test_y: torch.Tensor, classes: int, seed: int, epochs: int, lr: float,
                      batch_size: int, device: torch.device | None = None) -> float:
    """Fine-tune a copy of the backbone with a linear head (mean patch token) on the majority
    class of whole-footprint views (random flips and rotations); accuracy on the test views."""
    import copy

    from xstars.data import dihedral

    torch.manual_seed(seed)
    device = device or torch.device("cpu")
    model = copy.deepcopy(backbone).to(device).train()
    head = torch.nn.Linear(model.embed_dim, classes).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            rotation, flip = int(torch.randint(4, (1,), generator=generator)), bool(torch.rand(1, generator=generator) < 0.5)
            images = dihedral(train_x[index], rotation, flip).to(device)
            logits = head(model(images, sensor)[:, 1:].mean(dim=1))
            loss = F.cross_entropy(logits, train_y[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([head(model(test_x[i:i + batch_size].to(device), sensor)[:, 1:].mean(dim=1)).argmax(1).cpu()
                               for i in range(0, len(test_x), batch_size)])
    return float((predicted == test_y).float().mean())


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
