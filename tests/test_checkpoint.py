"""model/checkpoint.py: round trip and every refusal, with a small module built from a config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from microturn.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from microturn.model.config import ModelConfig, preset
from microturn.model.transformer import build_model

CONFIG = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, text_vocab=40)


class Toy(nn.Module):
    def __init__(self, config: ModelConfig, extra_layer: bool = False, drop_head: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.text_vocab, config.d_model)
        self.norm = nn.RMSNorm(config.d_model)
        if not drop_head:
            self.head = nn.Linear(config.d_model, config.text_vocab, bias=False)
        if extra_layer:
            self.extra = nn.Linear(config.d_model, config.d_model)
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Toy]:
    torch.manual_seed(0)
    model = Toy(CONFIG)
    save_checkpoint(tmp_path / "ckpt", model, CONFIG, extra={"step": 12, "note": "toy"})
    return tmp_path / "ckpt", model


def test_round_trip_restores_weights_config_and_extra(saved: tuple[Path, Toy]) -> None:
    path, original = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded, config = load_checkpoint(path, Toy, device="cpu")
    assert config == CONFIG
    assert read_config(path) == (CONFIG, {"step": 12, "note": "toy"})
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_weights_are_cast_to_the_factory_dtype(saved: tuple[Path, Toy]) -> None:
    path, original = saved
    loaded, _ = load_checkpoint(path, lambda c: Toy(c).to(torch.bfloat16))
    assert loaded.head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.head.weight, original.head.weight.to(torch.bfloat16))


def test_missing_directory_and_files(tmp_path: Path, saved: tuple[Path, Toy]) -> None:
    with pytest.raises(CheckpointError, match="directory not found"):
        load_checkpoint(tmp_path / "nowhere", Toy)
    path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: weights file not found"):
        load_checkpoint(path, Toy)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: config file not found"):
        load_checkpoint(path, Toy)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_are_refused(saved: tuple[Path, Toy], damage: str) -> None:
    path, _ = saved
    weights = path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"\x00not safetensors" * 8,
                         "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: corrupt or truncated"):
        load_checkpoint(path, Toy)


def _edit_config(path: Path, edit) -> None:
    document = json.loads((path / CONFIG_FILE).read_text())
    edit(document)
    (path / CONFIG_FILE).write_text(json.dumps(document))


def test_invalid_config_json(saved: tuple[Path, Toy]) -> None:
    path, _ = saved
    (path / CONFIG_FILE).write_text('{"config": {')
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: invalid JSON"):
        load_checkpoint(path, Toy)
    (path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_checkpoint(path, Toy)


def test_unknown_config_fields_and_versions(saved: tuple[Path, Toy]) -> None:
    path, _ = saved
    _edit_config(path, lambda d: d["config"].update(d_modle=64))
    with pytest.raises(CheckpointError, match=r"bad model config: unknown config fields: \['d_modle'\]"):
        load_checkpoint(path, Toy)
    _edit_config(path, lambda d: (d["config"].pop("d_modle"), d.update(format_version=99)))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path, Toy)
    _edit_config(path, lambda d: d.update(format_version=1, weights="elsewhere"))
    with pytest.raises(CheckpointError, match=r"unknown top-level fields \['weights'\]"):
        load_checkpoint(path, Toy)
    _edit_config(path, lambda d: (d.pop("weights"), d["config"].update(n_kv_heads=3)))
    with pytest.raises(CheckpointError, match="bad model config: n_heads must be a multiple"):
        load_checkpoint(path, Toy)


def test_missing_and_unexpected_tensors_are_named(saved: tuple[Path, Toy]) -> None:
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"2 tensors missing: extra\.bias, extra\.weight"):
        load_checkpoint(path, lambda c: Toy(c, extra_layer=True))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors: head\.weight"):
        load_checkpoint(path, lambda c: Toy(c, drop_head=True))


def test_shape_mismatch_names_tensor_and_shapes(saved: tuple[Path, Toy]) -> None:
    path, _ = saved
    wider = dataclasses.replace(CONFIG, text_vocab=50)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, lambda c: Toy(wider))
    message = str(info.value)
    assert WEIGHTS_FILE in message
    assert "embed.weight: expected [50, 32], found [40, 32]" in message
    assert "head.weight: expected [50, 32], found [40, 32]" in message


def test_save_overwrites_and_leaves_no_temporary_files(saved: tuple[Path, Toy]) -> None:
    path, _ = saved
    torch.manual_seed(1)
    newer = Toy(CONFIG)
    save_checkpoint(path, newer, CONFIG)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded, _ = load_checkpoint(path, Toy)
    assert torch.equal(loaded.head.weight, newer.head.weight)
    assert read_config(path)[1] == {}


def test_tiny_interaction_model_round_trip(tmp_path: Path) -> None:
    config = preset("tiny")
    original = build_model(config, seed=0)
    save_checkpoint(tmp_path / "tiny", original, config, extra={"preset": "tiny"})
    other_seed = build_model(config, seed=1)
    assert not torch.equal(other_seed.text_head.weight, original.text_head.weight)
    loaded, loaded_config = load_checkpoint(tmp_path / "tiny", lambda c: build_model(c, seed=1))
    assert loaded_config == config
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
