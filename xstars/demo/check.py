"""Check the pipeline against the demo world's ground truth (what no real world can offer)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xstars.demo import layout


def _truth_of(truth: Mapping[str, Any], item_id: str, site_id: str) -> dict[str, Any]:
    """The known shift of the scene an item was read from.

    STAC scenes are keyed ``<collection>/<item id>``; a WMS layer's sources ``<layer>/<city>``,
    and its STAC-like items are ``<layer>_<site id>`` (:func:`xstars.catalog.wms_items`).
    """
    if item_id.endswith(f"_{site_id}"):
        return truth[f"{item_id[: -len(site_id) - 1]}/{site_id.split('_')[0]}"]
    matches = [entry for key, entry in truth.items() if key.rsplit("/", 1)[-1] == item_id]
    if len(matches) != 1:
        raise KeyError(f"{item_id}: {len(matches)} scenes of that id in truth/shifts.json")
    return matches[0]


def coregistration_residuals(root: Path, part_records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per pair (sensor onto the reference), the true relative shift and what is left after correction.

    Figures are absolute per-axis values in pixels of the coarser sensor of the pair (the
    resolution the estimate is made at), over the estimates that were applied; flagged ones
    are counted apart.
    """
    truth = json.loads(layout.shifts_path(root).read_text())["scenes"]
    pairs: dict[str, dict[str, list]] = {}
    for part in part_records:
        for record in part["records"]:
            if record["status"] != "ok":
                continue
            site_id = record["site_id"]
            for sensor, shift in record["shifts"].items():
                reference = _truth_of(truth, record["items"][shift["reference"]], site_id)
                entry = pairs.setdefault(f"{sensor}->{shift['reference']}", {"before": [], "after": [], "flagged": []})
                true = _truth_of(truth, record["items"][sensor], site_id)
                gsd = shift["gsd_m"]
                true_rel = np.array([true["dx_m"] - reference["dx_m"], true["dy_m"] - reference["dy_m"]]) / gsd
                if not shift["applied"]:
                    entry["flagged"].append(site_id)
                    continue
                estimated = np.array([shift["dx_m"], shift["dy_m"]]) / gsd
                entry["before"] += np.abs(true_rel).tolist()
                entry["after"] += np.abs(true_rel - estimated).tolist()
    out = {}
    for name, entry in sorted(pairs.items()):
        before, after = np.array(entry["before"]), np.array(entry["after"])
        out[name] = {
            "estimates_applied": len(after) // 2,
            "flagged": len(entry["flagged"]),
            "before_median_px": round(float(np.median(before)), 4) if len(before) else None,
            "before_p95_px": round(float(np.percentile(before, 95)), 4) if len(before) else None,
            "after_median_px": round(float(np.median(after)), 4) if len(after) else None,
            "after_p95_px": round(float(np.percentile(after, 95)), 4) if len(after) else None,
        }
    return out
