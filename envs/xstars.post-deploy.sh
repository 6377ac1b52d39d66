#!/usr/bin/env bash
# Installs xstars itself into the environment of envs/xstars.yaml, without touching its
# dependencies (conda provides them). Snakemake runs this right after creating the environment,
# from the working directory, which is the repository root.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -e .
