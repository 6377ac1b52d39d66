"""Pretraining: the model, weight loading, the loop (resume, continual mode, export)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from tests.synthetic_store import SENSORS, write_store
from xstars import train
from xstars.config import deep_merge, load_config, run_settings
from xstars.errors import ConfigError, DataError
from xstars.losses import DINOLoss
from xstars.model import ViT, convert_state_dict, load_backbone, load_exported

ROOT = Path(__file__).resolve().parents[1]

#: A run small enough for CPU tests: ViT-Tiny at 32 px, a small DINO head.
TINY = {
    "model": {"arch": "vit_tiny", "dino_out_dim": 256, "dino_hidden_dim": 64, "dino_bottleneck_dim": 32,
              "drop_path": 0.1},
    "views": {"global_px": 32, "local_px": 16, "local_crops": 2},
    "optim": {"batch_size_per_gpu": 2, "epochs": 2, "warmup_epochs": 1},
    "msad": {"original": {"proj_dim": 32}, "dense": {"proj_dim": 16, "tokens_per_tile": 3}},
    "loader": {"num_workers": 0, "shuffle_buffer": 3},
    "checkpoint_every_steps": 2,
    "sensors": list(SENSORS),  # those of the synthetic store
    "dino_sensors": list(SENSORS),
}


def tiny_settings(**run) -> dict:
    config = load_config(ROOT / "config.yaml")
    config["pretrain"] = deep_merge(config["pretrain"], TINY) | {"runs": {"test": run}}
    return run_settings(config, "test")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "dataset.zarr", samples=9, samples_per_shard=3)


# ================================================================================== model


def test_vit_has_one_patch_embedding_per_sensor_and_any_grid() -> None:
    vit = ViT({"s2": 10, "ign": 4}, arch="vit_tiny", img_size=32)
    assert vit(torch.randn(2, 10, 32, 32), "s2").shape == (2, 1 + 4, 192)
    assert vit(torch.randn(2, 4, 64, 64), "ign").shape == (2, 1 + 16, 192)  # position embedding interpolated
    with pytest.raises(DataError, match="no patch embedding for sensor 'l8'"):
        vit(torch.randn(1, 7, 32, 32), "l8")


def _timm_state(vit: ViT, sensor: str) -> dict:
    state = {("patch_embed.proj." + k.split(".proj.")[1] if k.startswith(f"patch_embed.{sensor}.") else k): v
             for k, v in vit.state_dict().items() if k.startswith(("patch_embed." + sensor, "cls", "pos", "blocks",
                                                                   "norm"))}
    return state | {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}


def test_timm_and_dino_layouts_load_strictly() -> None:
    source = ViT({"ign": 3}, arch="vit_tiny", img_size=32)
    timm_state = _timm_state(source, "ign")
    dino_state = {"teacher": {f"backbone.{k}": v for k, v in timm_state.items() if not k.startswith("head.")}
                  | {"head.mlp.0.weight": torch.zeros(4, 4)}, "student": {}}
    for state in (timm_state, {"model": timm_state}, dino_state):
        target = ViT({"ign": 3, "s2": 10}, arch="vit_tiny", img_size=32)
        converted, layout = convert_state_dict(state, "ign")
        assert layout == "timm"
        load_backbone(target, converted, new_sensors=["s2"])  # s2 is new: its embedding may be missing
        assert torch.equal(target.patch_embed["ign"].proj.weight, source.patch_embed["ign"].proj.weight)
        assert torch.equal(target.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)


def test_loading_wrong_keys_lists_them_instead_of_loading_nothing() -> None:
    # The released code loaded MAE-style keys with strict=False: nothing was loaded, silently.
    source = ViT({"ign": 3}, arch="vit_tiny", img_size=32)
    mae = {f"encoder.{k}": v for k, v in _timm_state(source, "ign").items()}
    target = ViT({"ign": 3}, arch="vit_tiny", img_size=32)
    converted, _ = convert_state_dict(mae, "ign")
    with pytest.raises(DataError) as error:
        load_backbone(target, converted, source="mae.pth")
    message = str(error.value)
    assert "mae.pth does not match the backbone" in message
    assert "missing keys (" in message and "blocks.0.attn.qkv.weight" in message
    assert "unexpected keys (" in message and "encoder.blocks.0.attn.qkv.weight" in message
    small = ViT({"ign": 3}, arch="vit_small", img_size=32)
    with pytest.raises(DataError, match=r"shapes differ .*cls_token: \(1, 1, 384\) in checkpoint, \(1, 1, 192\)"):
        load_backbone(target, convert_state_dict(small.state_dict(), "ign")[0])


def test_dino_loss_matches_its_definition() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(8, n_crops=3, teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                       epochs=1)
    student, teacher = torch.randn(3 * 4, 8), torch.randn(2 * 4, 8)
    s = (student / 0.1).log_softmax(-1).chunk(3)
    t = (teacher / 0.04).softmax(-1).chunk(2)  # centre is 0 at first
    expected = sum(-(t[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(3) if v != i) / 4
    assert torch.allclose(loss_fn(student, teacher, 0), expected)
    assert torch.allclose(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))


def test_run_settings_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match=r"'pretrain\.runs\.test\.dino_sensors\[0\]': 'modis' is not one of"):
        tiny_settings(dino_sensors=["modis"])
    with pytest.raises(ConfigError, match=r"'pretrain\.runs\.test\.continual': give exactly one of checkpoint"):
        tiny_settings(mode="continual", dino_sensors=["ign"])


# =================================================================================== loop


def test_msad_heads_are_trained_and_checkpointed(store: Path, tmp_path: Path) -> None:
    summary = train.pretrain(store, tiny_settings(), tmp_path, seed=0, max_steps=2, progress=False)
    assert summary["steps"] == 2 and not summary["complete"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    head_keys = [k for k in state["student"] if k.startswith("msad_head.")]
    assert head_keys and all(k in state["student"] for k in ("msad_head.shared.weight",
                                                              "msad_head.heads.1.norm.weight"))
    # Every trainable parameter (MSAD's heads included) has optimiser state: it was stepped;
    # all but DINO's last layer, frozen during the first epoch as in DINO.
    model = train.build_student(tiny_settings(), {"s2": 4, "l8": 3, "ign": 4})
    trainable = [p for name, p in model.named_parameters() if p.requires_grad and "last_layer" not in name]
    assert len(state["optimizer"]["state"]) == len(trainable)
    assert not torch.equal(state["student"]["msad_head.shared.weight"], model.msad_head.shared.weight)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["msad"] > 0 for r in records)


@pytest.mark.parametrize(("variant", "pairs_per_step"), [("original", 0), ("dense", 0), ("dense", 1)])
def test_resume_continues_exactly(store: Path, tmp_path: Path, variant: str, pairs_per_step: int) -> None:
    settings = tiny_settings(msad={"variant": variant, "pairs_per_step": pairs_per_step})
    whole = train.pretrain(store, settings, tmp_path / "whole", seed=1, progress=False)
    assert whole["complete"] and whole["steps"] == 6  # 6 training samples / batch 2, 2 epochs
    train.pretrain(store, settings, tmp_path / "cut", seed=1, max_steps=3, progress=False)  # stops mid-epoch
    resumed = train.pretrain(store, settings, tmp_path / "cut", seed=1, progress=False)
    assert resumed == whole
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "cut")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in run] for run in lines]
    assert strip[0] == strip[1]  # the same losses at every step, before and after the cut
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])


def test_export_and_continual_pretraining_from_it(store: Path, tmp_path: Path) -> None:
    # A Sentinel-2-only DINO model, exported...
    source = tiny_settings(sensors=["s2"], dino_sensors=["s2"], msad={"alpha": 0}, optim={"epochs": 1})
    train.pretrain(store, source, tmp_path / "s2", seed=0, progress=False)
    backbone, description = load_exported(tmp_path / "s2" / "backbone.safetensors")
    assert description["sensors"]["s2"]["bands"] == ["B02", "B03", "B04", "B08"]
    assert len(description["sensors"]["s2"]["mean"]) == 4 and description["architecture"]["arch"] == "vit_tiny"
    # ...then adapted to the orthophotos while a frozen copy of it gives Sentinel-2's features.
    continual = tiny_settings(mode="continual", sensors=["s2", "ign"], dino_sensors=["ign"],
                              continual={"checkpoint": str(tmp_path / "s2" / "backbone.safetensors")},
                              optim={"epochs": 1})
    summary = train.pretrain(store, continual, tmp_path / "ign", seed=0, progress=False)
    assert summary["complete"]
    state = torch.load(tmp_path / "ign" / "checkpoint.pt", weights_only=True)
    loaded = backbone.state_dict()
    assert all(torch.equal(state["frozen"][k], loaded[k]) for k in loaded)  # frozen: the source model, untouched
    assert not torch.equal(state["student"]["backbone.blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])
    _exported, description = load_exported(tmp_path / "ign" / "backbone.safetensors")
    assert set(description["sensors"]) == {"s2", "ign"}
    # A checkpoint of another architecture is refused with the keys that differ.
    wrong = tiny_settings(mode="continual", sensors=["s2", "ign"], dino_sensors=["ign"], model={"arch": "vit_small"},
                          continual={"checkpoint": str(tmp_path / "s2" / "backbone.safetensors")})
    with pytest.raises(DataError, match="shapes differ"):
        train.pretrain(store, wrong, tmp_path / "wrong", seed=0, progress=False)


def test_cosine_schedule_warms_up_then_decays() -> None:
    values = train.cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    assert len(values) == 20 and values[0] == 0.0 and values[5] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(values[5:])) and values[-1] < 0.02


def test_rgb_only_runs_know_every_sensors_rgb_bands() -> None:
    from xstars.config import run_bands

    config = load_config(ROOT / "config.yaml")
    settings = run_settings(config, "dino_only") | {"rgb_only": True}
    assert run_bands(settings) == {"s2": ["B04", "B03", "B02"], "l8": ["red", "green", "blue"], "ign": ["R", "G", "B"],
                                   "spot": ["R", "G", "B"]}
    with pytest.raises(ConfigError, match=r"'pretrain.rgb_bands': rgb_only needs the red, green and blue bands of spot"):
        run_bands(settings | {"rgb_bands": {k: v for k, v in settings["rgb_bands"].items() if k != "spot"}})
