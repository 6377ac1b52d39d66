"""Probes and metrics of the downstream tasks, on frozen features (and the fine-tuning baseline).

DINO's weighted k-NN classifier, linear probes (full batch L-BFGS, deterministic given the
seed) for the majority class and the multi-label presence, a linear segmentation head on the
patch tokens, the seeded label subsets of the label-efficiency runs, and the metrics: mean
average precision, mIoU, cross-sensor retrieval top-k; :func:`finetune_accuracy` fine-tunes a
copy of the backbone instead. Tensors in, numbers out: the store's tasks (:mod:`xstars.evaluate`)
and the public benchmarks (:mod:`xstars.benchmarks`) both call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xstars.model import ViT

NO_LABEL = 255  # label pixels without a class (no data), ignored by every metric


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
