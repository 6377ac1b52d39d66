"""Figures: every picture of the workflow's report, from the files the stages write.

The catalog's map and scene dates (:func:`plot_manifest`), the store's samples and
co-registration shifts (:func:`plot_samples`, :func:`plot_shifts`), the pretraining loss curves
(:func:`plot_losses`) and the evaluation's label-efficiency curves and retrieval examples
(:func:`plot_label_efficiency`, :func:`plot_retrieval_examples`). Each reads what its stage
wrote (manifest, store, metrics, results) and writes one PNG; none computes what a stage
decides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xstars import items as stac_items
from xstars.layout import image_sensors, labels_sensor, open_store, store_sensors

# ========================================================================= catalog


def plot_manifest(path: Path, out: Path) -> Path:
    """The catalog at a glance (Snakemake report): where the sites are, by split and status, and
    when and how clear the chosen scenes are, per sensor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    from xstars.manifest import Manifest
    from xstars.sites import france_boundary

    manifest = Manifest(path)
    frame = manifest.frame()
    crs = frame.crs.to_string()
    sites = frame.drop_duplicates("site_id")
    fig, (ax_map, ax_time) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    boundary = france_boundary(crs)
    ax_map.plot(*boundary.exterior.xy, color="0.4", lw=0.8)
    colours = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
    for split, colour in colours.items():
        kept = sites[(sites.split == split) & (sites.status == "ok")]
        ax_map.scatter(kept.geometry.centroid.x, kept.geometry.centroid.y, s=8, color=colour,
                       label=f"{split} ({len(kept)})")
    dropped = sites[sites.status != "ok"]
    ax_map.scatter(dropped.geometry.centroid.x, dropped.geometry.centroid.y, s=14, marker="x", color="crimson",
                   label=f"dropped ({len(dropped)})")
    ax_map.set_aspect("equal")
    ax_map.set_title(f"{len(sites)} sites ({crs})")
    ax_map.legend(loc="lower left", fontsize=8)
    ax_map.set_xticks([])
    ax_map.set_yticks([])
    # The image sensors, as the manifest's provenance describes them (labels have no date to show).
    kinds = {name: cfg["kind"] for name, cfg in manifest.provenance.get("sensors", {}).items()}
    images = [name for name in dict.fromkeys(frame.sensor) if kinds.get(name, "stac_raster") != "stac_labels"]
    chosen = frame[(frame.status == "ok") & frame.sensor.isin(images)]
    sc = None
    for row, sensor in enumerate(images):
        part = chosen[chosen.sensor == sensor]
        times = [stac_items.parse_time(t) for t in part.datetime]
        sc = ax_time.scatter(times, np.full(len(times), row) + np.linspace(-0.3, 0.3, len(times)),
                             c=part.invalid_fraction, cmap="viridis_r", vmin=0, vmax=0.2, s=10)
    locator = mdates.AutoDateLocator()
    ax_time.xaxis.set_major_locator(locator)
    ax_time.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax_time.set_yticks(range(len(images)), [f"{name} (campaign year)" if kinds.get(name) == "wms_layers" else name
                                            for name in images])
    ax_time.set_title("chosen scenes: date, and cloud/no-data fraction over the footprint")
    if sc is not None:
        fig.colorbar(sc, ax=ax_time, label="invalid fraction of the footprint")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# =========================================================================== store


#: ESA WorldCover's own colours, used when the labels are its classes.
WORLDCOVER_COLOURS = {10: "#006400", 20: "#ffbb22", 30: "#ffff4c", 40: "#f096ff", 50: "#fa0000", 60: "#b4b4b4",
                      70: "#f0f0f0", 80: "#0064c8", 90: "#0096a0", 95: "#00cf75", 100: "#fae6a0"}


def store_rgb_bands(root) -> dict[str, list[str]]:
    """Image sensor -> the three bands its figures show: its red, green and blue bands as the
    build recorded them, else its first three bands (a single band thrice)."""
    recorded = root.attrs["xstars"].get("sensors", {})
    out = {}
    for name in image_sensors(root):
        rgb = (recorded.get(name) or {}).get("rgb_bands")
        bands = [str(b) for b in root[name]["band"][:]]
        out[name] = list(rgb) if rgb else (bands[:3] if len(bands) >= 3 else bands[:1] * 3)
    return out


def rgb_image(group, sample: int, rgb_bands: Sequence[str]) -> np.ndarray:
    """A sensor's tile as true colour for figures ([H, W, 3] in 0-1, 2-98 % stretch, invalid in red)."""
    names = list(group["band"][:])
    data = group["data"][sample][[names.index(b) for b in rgb_bands]].astype(np.float32)
    valid = group["valid"][sample].astype(bool)
    low, high = np.percentile(data[:, valid], (2, 98)) if valid.any() else (0, 1)
    image = np.clip((data - low) / max(high - low, 1e-6), 0, 1).transpose(1, 2, 0)
    image[~valid] = image[~valid] * 0.3 + np.array([0.6, 0.0, 0.0]) * 0.7
    return image


def label_colours(codes: Sequence[int]) -> list[str]:
    """A colour per class code: WorldCover's when they are its classes, else a qualitative map."""
    import matplotlib

    if set(codes) <= set(WORLDCOVER_COLOURS):
        return [WORLDCOVER_COLOURS[c] for c in codes]
    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(len(codes))]


def plot_samples(path: Path, out: Path, count: int = 4) -> Path:
    """A few sites as each image sensor stores them (true colour, the co-registration reference
    first), beside their label map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr
    from matplotlib.colors import ListedColormap

    root = zarr.open_group(str(path), mode="r")
    rgb = store_rgb_bands(root)
    reference = root.attrs["xstars"].get("coregister_reference")
    columns = sorted(rgb, key=lambda name: name != reference)
    labels = labels_sensor(root)
    first = next(iter(store_sensors(root)))
    status = root[first]["status"][:]
    ok = np.nonzero(status == "ok")[0]
    picks = ok[np.linspace(0, len(ok) - 1, min(count, len(ok))).round().astype(int)] if len(ok) else []
    width = len(columns) + (labels is not None)
    fig, axes = plt.subplots(max(len(picks), 1), width, figsize=(3 * width, 3.1 * max(len(picks), 1)),
                             squeeze=False)
    if not len(picks):
        axes[0, 0].text(0, 0.5, "no site kept: see summary.json for the reasons", fontsize=12)
        for ax in axes[0]:
            ax.set_axis_off()
    codes = [int(c) for c in root[labels]["data"].attrs.get("flag_values", [])] if labels else []
    lut = np.zeros(256, dtype=int)
    lut[codes] = np.arange(len(codes))
    for row, sample in enumerate(picks):
        for col, sensor in enumerate(columns):
            group = root[sensor]
            axes[row, col].imshow(rgb_image(group, sample, rgb[sensor]), interpolation="nearest")
            axes[row, col].set_title(f"{sensor} {group['date'][sample][:10]}", fontsize=8)
        if labels is not None:
            classes = root[labels]["data"][sample][0]
            axes[row, -1].imshow(lut[classes], cmap=ListedColormap(label_colours(codes)), vmin=0,
                                 vmax=len(codes) - 1, interpolation="nearest")
            axes[row, -1].set_title(f"{labels} {root[first]['site_id'][sample]}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_shifts(path: Path, summary: Mapping[str, Any], out: Path) -> Path:
    """Histogram of the estimated co-registration shifts of every sensor moved onto the
    reference, and the kept/dropped counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    root = zarr.open_group(str(path), mode="r")
    reference = root.attrs["xstars"].get("coregister_reference", "the reference")
    moved = [name for name in image_sensors(root) if name != reference]
    fig, axes = plt.subplots(1, len(moved) + 1, figsize=(4.7 * (len(moved) + 1), 4), squeeze=False)
    for ax, sensor in zip(axes[0][:-1], moved, strict=True):
        group = root[sensor]
        gsd = float(group["data"].attrs["gsd_m"])
        applied = group["shift_applied"][:].astype(bool)
        norm = np.hypot(group["shift_x_m"][:], group["shift_y_m"][:]) / gsd
        bins = np.linspace(0, max(3.0, float(np.nanmax(norm, initial=0))), 25)
        ax.hist([norm[applied], norm[~applied & np.isfinite(norm)]], bins=bins, stacked=True,
                label=["applied", "flagged (not applied)"], color=["tab:blue", "tab:red"])
        ax.set_xlabel(f"estimated shift of {sensor} onto {reference} (pixels of {gsd:g} m)")
        ax.set_ylabel("sites")
        ax.legend(fontsize=8)
    counts = {"kept": summary["kept"], **summary["dropped_by_reason"]}
    axes[0][-1].barh(list(counts), list(counts.values()), color=["tab:green"] + ["tab:red"] * (len(counts) - 1))
    axes[0][-1].set_title("sites kept, and dropped by reason")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ===================================================================== pretraining


def plot_losses(runs: Mapping[str, Path], out: Path) -> Path:
    """Loss curves (total, DINO, MSAD) of every run, from their metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, path in runs.items():
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        steps = [r["step"] for r in records]
        for ax, key in zip(axes, ("loss", "dino", "msad"), strict=True):
            ax.plot(steps, [r[key] for r in records], label=name, lw=1.2)
    for ax, title in zip(axes, ("total loss", "DINO", "MSAD (before alpha)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ====================================================================== evaluation


def plot_label_efficiency(results: Sequence[Mapping[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xstars.evaluate import summarise

    rows = summarise(results)
    metrics = [("classification", "linear_accuracy", "linear probe accuracy"),
               ("classification", "knn_accuracy", "k-NN accuracy"), ("segmentation", "miou", "segmentation mIoU")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(13, 3.6))
    for ax, (task, metric, title) in zip(axes, metrics, strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            chosen = [r for r in rows if r["model"] == model and r["task"] == task and r["metric"] == metric]
            fractions = sorted({r["fraction"] for r in chosen})
            means = [np.mean([r["mean"] for r in chosen if r["fraction"] == f]) for f in fractions]
            spread = [np.mean([r["std"] for r in chosen if r["fraction"] == f]) for f in fractions]
            ax.errorbar([100 * f for f in fractions], means, yerr=spread, marker="o", capsize=3, label=model)
        ax.set_xscale("log")
        ax.set_xlabel("% of training labels")
        ax.set_title(title + " (mean over sensors)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_retrieval_examples(results: Sequence[Mapping[str, Any]], store: Path | str, out: Path,
                            pair: str | None = None, queries: int = 3) -> Path:
    """For a few test tiles seen by sensor A: the 3 tiles each model retrieves among sensor B's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = open_store(store)
    rgb = store_rgb_bands(root)
    pair = pair or next(iter(results[0]["retrieval_examples"]))
    a, b = pair.split("->")
    test_ids = results[0]["test_ids"]
    fig, axes = plt.subplots(queries, 1 + 3 * len(results), figsize=(1.6 * (1 + 3 * len(results)), 1.7 * queries),
                             squeeze=False)
    for q in range(min(queries, len(test_ids))):
        axes[q, 0].imshow(rgb_image(root[a], test_ids[q], rgb[a]))
        axes[q, 0].set_title(f"{a} query", fontsize=7)
        for m, result in enumerate(results):
            for k, found in enumerate(result["retrieval_examples"][pair][q]):
                ax = axes[q, 1 + 3 * m + k]
                ax.imshow(rgb_image(root[b], test_ids[found], rgb[b]))
                colour = "green" if found == q else "red"
                ax.set_title(f"{result['model']} #{k + 1}" if k == 0 else f"#{k + 1}", fontsize=7, color=colour)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"cross-sensor retrieval {a} -> {b} on the test split (green: the same tile)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
