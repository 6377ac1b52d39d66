"""Multi-process training with torchrun (DDP, gloo on CPU): runs in CI, no GPU needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.synthetic_store import write_store
from tests.test_pretrain import tiny_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "dataset.zarr", samples=12, samples_per_shard=2)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_msad_goes_through_the_ddp_wrapper_gradients_agree_across_ranks(store: Path, tmp_path: Path) -> None:
    settings = tiny_settings(msad={"variant": "dense"})
    done = torchrun("tests/ddp_step.py", str(store), json.dumps(settings), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["index"], ranks[1]["index"])  # each rank had its own tiles
    assert ranks[0]["msad"] != ranks[1]["msad"]  # ...so its own loss
    grads = [r["grads"] for r in ranks]
    assert set(grads[0]) == set(grads[1])
    heads = [name for name in grads[0] if name.startswith("msad_head.")]
    assert heads and all(grads[0][name].abs().sum() > 0 for name in heads)
    # DDP averaged every gradient, MSAD's heads included: the ranks hold the same ones.
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_cli_trains_with_two_processes_and_the_checkpoint_loads(store: Path, tmp_path: Path) -> None:
    from xstars.config import load_config

    full = load_config(ROOT / "config.yaml")
    settings = tiny_settings()
    full["pretrain"] = settings | {"runs": {"ddp": {}}}
    done = subprocess.run(
        [sys.executable, "-m", "xstars", "pretrain", "run", "--config-json", json.dumps(full), "--store", str(store),
         "--run", "ddp", "--out-dir", str(tmp_path / "ddp"), "--nproc", "2", "--max-steps", "2"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert state["steps_per_epoch"] == 2  # 8 training tiles / (2 per GPU x 2 GPUs)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # written once, by rank 0
