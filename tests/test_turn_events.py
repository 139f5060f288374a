"""Barge-in detection of `TurnEvents`: who speaks in each micro-turn, from the turn's audio levels alone."""

from __future__ import annotations

import numpy as np
import pytest

from microturn.server.conversation import Conversation
from microturn.server.settings import ServerSettings
from microturn.server.turn_events import MODEL_HANGOVER_TURNS, TurnEvents

TURN = 3_200  # samples in one 200 ms micro-turn at 16 kHz
LOUD = np.full(TURN, 0.3, np.float32)  # about -10 dBFS: speech on either side
QUIET = np.zeros(TURN, np.float32)


def _turns(settings: ServerSettings | None = None) -> tuple[TurnEvents, list]:
    sent: list = []
    return TurnEvents(settings or ServerSettings(), sent.append, Conversation()), sent


@pytest.mark.parametrize("gap", range(MODEL_HANGOVER_TURNS + 2))
def test_speech_in_a_short_pause_of_the_reply_is_a_barge_in_and_after_it_is_not(gap):
    turns, sent = _turns()
    seq = 0
    for _ in range(3):  # the model speaks, the user is quiet
        assert not turns.voice_activity(seq, QUIET, LOUD)
        seq += 1
    for _ in range(gap):  # the reply pauses
        assert not turns.voice_activity(seq, QUIET, QUIET)
        seq += 1
    barged = turns.voice_activity(seq, LOUD, QUIET)
    assert barged == (gap < MODEL_HANGOVER_TURNS), gap
    assert [type(e).__name__ for e in sent] == ["InputAudioBufferSpeechStarted"]


def test_speech_over_a_quiet_model_is_no_barge_in_and_barge_in_off_is_never_one():
    turns, _ = _turns()
    assert not any(turns.voice_activity(seq, LOUD if seq == 5 else QUIET, QUIET) for seq in range(6))
    turns, _ = _turns(ServerSettings(barge_in=False))
    assert not turns.voice_activity(0, QUIET, LOUD) and not turns.voice_activity(1, LOUD, LOUD)
