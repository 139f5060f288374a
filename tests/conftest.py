"""Shared pytest fixtures built in code (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

from microturn.training.espeak import speak

SPEECH_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells."
)


@pytest.fixture(scope="session")
def speech_16k() -> np.ndarray:
    """A few seconds of real espeak-ng speech: mono float32 at 16 kHz, with natural pauses."""
    return speak(SPEECH_TEXT, voice="en", speed=160, pitch=50, rate=16_000)
