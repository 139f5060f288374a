"""Fixtures the framework test modules share (they load it with `pytest_plugins`)."""

from __future__ import annotations

import pytest

from microturn.model.engine import Engine

from .frameworks import BARGE_IN_TEXT, speech_pcm
from .realserver import demo_engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The shipped demo model, warm, for one framework module."""
    return demo_engine(2)


@pytest.fixture(scope="module")
def hello_pcm() -> bytes:
    """Speech to barge in with, made once per module."""
    return speech_pcm(BARGE_IN_TEXT)
