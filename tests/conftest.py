"""Shared pytest fixtures built in code (no downloads)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from microturn.model.config import ModelConfig, tiny
from microturn.training.espeak import speak

SPEECH_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells."
)


@pytest.fixture(scope="session")
def speech_16k() -> np.ndarray:
    """A few seconds of real espeak-ng speech: mono float32 at 16 kHz, with natural pauses."""
    return speak(SPEECH_TEXT, voice="en", speed=160, pitch=50, rate=16_000)


@pytest.fixture
def micro_config() -> ModelConfig:
    """The tiny preset shrunk to a model that trains a few steps in seconds on a CPU."""
    return dataclasses.replace(tiny(), d_model=64, n_layers=2, n_experts=4, d_expert=64, d_channel_embed=4)
