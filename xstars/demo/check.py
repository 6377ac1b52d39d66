"""Check the pipeline against the demo world's ground truth (what no real world can offer)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xstars.demo import layout

#: Sensor -> how its scenes are keyed in truth/shifts.json.
_TRUTH_COLLECTION = {"s2": "sentinel-2-l2a", "l8": "landsat-c2-l2"}


def coregistration_residuals(root: Path, part_records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per pair (sensor onto the reference), the true relative shift and what is left after correction.

    Figures are absolute per-axis values in pixels of the coarser sensor of the pair (the
    resolution the estimate is made at), over the estimates that were applied; flagged ones
    are counted apart. Only IGN is supported as the reference (the build's default).
    """
    truth = json.loads(layout.shifts_path(root).read_text())["scenes"]
    pairs: dict[str, dict[str, list]] = {}
    for part in part_records:
        for record in part["records"]:
            if record["status"] != "ok":
                continue
            city = record["site_id"].split("_")[0]
            year = record["items"]["ign"].split("ORTHOPHOTOS")[1].split("_")[0]
            reference = truth[f"ign/{year}/{city}"]
            for sensor, shift in record["shifts"].items():
                if shift["reference"] != "ign":
                    raise ValueError(f"only IGN as the reference is supported, got {shift['reference']!r}")
                entry = pairs.setdefault(f"{sensor}->ign", {"before": [], "after": [], "flagged": []})
                true = truth[f"{_TRUTH_COLLECTION[sensor]}/{record['items'][sensor]}"]
                gsd = shift["gsd_m"]
                true_rel = np.array([true["dx_m"] - reference["dx_m"], true["dy_m"] - reference["dy_m"]]) / gsd
                if not shift["applied"]:
                    entry["flagged"].append(record["site_id"])
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
