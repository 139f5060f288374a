"""The ear (model/ear.py): counted by params.py, gain-free and token-local, and grown onto a
checkpoint without changing what it computes until training moves it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from microturn.cli import main as cli_main
from microturn.model import params
from microturn.model.checkpoint import read_config, save_checkpoint
from microturn.model.config import ModelConfig, tiny
from microturn.model.layout import sequence_logits
from microturn.model.transformer import InteractionModel, build_model
from microturn.training.data import DuplexGenerator
from microturn.training.train import EAR_LR_SCALE, compute_losses, grow_ear, make_optimizers


def test_the_ear_is_counted(micro_config: ModelConfig) -> None:
    cfg = dataclasses.replace(micro_config, ear_channels=6)
    model = InteractionModel(cfg)
    assert params.param_breakdown(cfg)["ear"] == sum(p.numel() for p in model.ear.parameters()) > 0
    assert params.total_params(cfg) == sum(p.numel() for p in model.parameters())
    assert params.param_breakdown(micro_config)["ear"] == 0 and InteractionModel(micro_config).ear is None


def test_the_ear_ignores_gain_and_hears_each_token_alone(micro_config: ModelConfig) -> None:
    model = build_model(dataclasses.replace(micro_config, ear_channels=4), seed=0)
    torch.nn.init.normal_(model.ear.proj.weight)
    codes = torch.randint(1, 15, (2, 3, micro_config.frames_per_audio_token, micro_config.dmel_channels))
    with torch.no_grad():
        base = model.ear(codes)  # (B, T, D)
        louder = codes.clone()
        louder[:, :, 1] += 1  # one frame of every token 6 dB louder in every channel
        assert torch.allclose(model.ear(louder), base, atol=1e-5)
        changed = codes.clone()
        changed[0, 1] = torch.randint(0, 16, changed[0, 1].shape)
        out = model.ear(changed)
    assert not torch.allclose(out[0, 1], base[0, 1])
    assert torch.equal(out[0, [0, 2]], base[0, [0, 2]]) and torch.equal(out[1], base[1])


def test_a_grown_model_computes_what_it_grew_from_until_it_trains(micro_config: ModelConfig) -> None:
    model = build_model(micro_config, seed=0).eval()
    grown, cfg = grow_ear(model, micro_config, channels=4, seed=0)
    assert cfg.ear_channels == 4 and cfg == dataclasses.replace(micro_config, ear_channels=4)
    prefix, turns, heard = DuplexGenerator(micro_config, "train", seed=0, turns=12).batch(0, 2)
    with torch.no_grad():
        before, after = sequence_logits(model, prefix, turns), sequence_logits(grown.eval(), prefix, turns)
    for a, b in zip(before[:2], after[:2], strict=True):
        assert torch.equal(a, b)
    grown.train()
    opt, = make_optimizers(grown, lr=1e-3, weight_decay=0.0)
    ear = {id(p) for p in grown.ear.parameters()}
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(rates[id(p)] == (1e-3 * EAR_LR_SCALE if id(p) in ear else 1e-3) for p in grown.parameters())
    convs = [c.weight.detach().clone() for c in grown.ear.convs]
    for _ in range(2):  # the first step moves the zero projection, the second the convolutions behind it
        opt.zero_grad()
        compute_losses(grown, prefix, turns, heard, heard_weight=0.2).total.backward()
        opt.step()
    assert grown.ear.proj.weight.abs().sum() > 0
    assert all(not torch.equal(before, c.weight) for before, c in zip(convs, grown.ear.convs, strict=True))
    with pytest.raises(SystemExit, match="already has an ear"):
        grow_ear(grown, cfg, channels=4, seed=0)


def test_train_cli_grows_an_ear_on_a_checkpoint_and_resumes_it(tmp_path: Path,
                                                               micro_config: ModelConfig) -> None:
    source, out = tmp_path / "source", tmp_path / "run"
    save_checkpoint(source, build_model(micro_config, seed=0), micro_config)
    flags = ["--out", str(out), "--batch", "1", "--turns", "8", "--warmup", "1", "--device", "cpu",
             "--checkpoint", str(source), "--ear-channels", "4"]
    assert cli_main(["train", *flags, "--steps", "1"]) == 0
    cfg, extra = read_config(out)
    assert cfg == dataclasses.replace(micro_config, ear_channels=4) and extra["recipe"]["ear_channels"] == 4
    assert cli_main(["train", *flags, "--steps", "2", "--resume"]) == 0
    assert read_config(out)[1]["step"] == 2


def test_train_cli_builds_an_ear_into_a_preset_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--batch", "1", "--turns", "8", "--warmup", "1", "--device",
                     "cpu", "--steps", "1", "--ear-channels", "2"]) == 0
    assert read_config(out)[0] == dataclasses.replace(tiny(), ear_channels=2)
    with pytest.raises(ValueError, match="ear_channels"):
        dataclasses.replace(tiny(), ear_channels=-1)
