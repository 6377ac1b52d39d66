"""Benchmark: time and peak memory of demo-world generation at the default demo size.

Issue 2's budget: under 2 minutes and under 1 GB on 2 cores. Runs the generator in a child
process so that the peak resident memory (ru_maxrss of the child) is the generator's alone.

    .venv/bin/python bench/bench_demo_generate.py [--repeat 2] [--config config.yaml]

Prints one JSON line per run and a summary; record the figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys
from pathlib import Path
from xstars.demo.generate import generate_world
generate_world(Path(sys.argv[1]), json.loads(sys.argv[2]))
"""


def run_once(demo_cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, tmp, json.dumps(demo_cfg)], check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 0), "disk_mb": round(size / 2**20, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from xstars.config import load_config

    demo_cfg = load_config(args.config)["demo"]
    runs = [run_once(demo_cfg) for _ in range(args.repeat)]
    for r in runs:
        print(json.dumps(r))
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores", "cities": len(demo_cfg["cities"]),
                      "extent_m": demo_cfg["extent_m"], "best_wall_s": min(r["wall_s"] for r in runs),
                      "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}))


if __name__ == "__main__":
    main()
