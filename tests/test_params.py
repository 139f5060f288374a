"""model/params.py: the analytic counts against the real model's parameters and hand arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from microturn.model import params
from microturn.model.config import PRESETS, ModelConfig, preset
from microturn.model.transformer import InteractionModel


@pytest.mark.parametrize("config", [
    *(preset(name) for name in PRESETS),
    ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, n_experts=4, top_k=1, d_expert=96,
                n_shared_experts=2, d_shared=80, video_patches=0, text_vocab=300),
], ids=[*PRESETS, "two-shared-experts"])
def test_total_equals_the_real_models_parameter_count(config: ModelConfig) -> None:
    with torch.device("meta"):  # shapes only: even the 276B preset costs no memory
        model = InteractionModel(config)
    assert params.total_params(config) == sum(p.numel() for p in model.parameters())


def test_active_params_drop_exactly_the_idle_experts() -> None:
    config = preset("tiny")
    everything = dataclasses.replace(config, top_k=config.n_experts)
    assert params.active_params(everything) == params.total_params(everything)
    one_fewer = dataclasses.replace(config, top_k=config.top_k - 1)
    per_expert = config.n_layers * 3 * config.d_model * config.d_expert
    assert params.active_params(config) - params.active_params(one_fewer) == per_expert
    idle = config.n_experts - config.top_k
    assert params.total_params(config) - params.active_params(config) == idle * per_expert


def test_interaction_small_is_the_paper_shape() -> None:
    config = preset("interaction-small")
    assert abs(params.total_params(config) - 276e9) < 1e9
    assert abs(params.active_params(config) - 12e9) < 0.5e9


def test_kv_bytes_per_token() -> None:
    config = preset("tiny")
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2  # k and v, bf16
    assert params.kv_bytes_per_token(config) == per_token
    assert params.kv_bytes_per_token(config, bytes_per_element=4) == 2 * params.kv_bytes_per_token(config)
    assert params.report(config).kv_bytes_per_session == params.kv_bytes_per_token(config) * config.window


def test_flops_per_turn_is_dense_work_plus_attention_over_the_window() -> None:
    config = preset("small")
    dense = 2 * params.active_params(config) * config.positions_per_turn
    wider = dataclasses.replace(config, window=2 * config.window)
    attention = params.flops_per_turn(config) - dense
    assert attention == (config.positions_per_turn * 4 * config.n_layers * config.n_heads * config.head_dim
                         * config.window)
    assert params.flops_per_turn(wider) - params.flops_per_turn(config) == attention


def test_breakdown_sums_to_total_for_every_preset() -> None:
    for name in ("tiny", "small", "base", "interaction-small"):
        config = preset(name)
        report = params.report(config)
        assert sum(params.param_breakdown(config).values()) == report.total_params
        assert 0 < report.active_params < report.total_params
