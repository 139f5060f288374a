"""The engine core in its own process: outputs as in-process, deadlines, death, restart, no torch here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from helpers.realserver import process_engine, warm_engine

from microturn.model.engine_core import EngineSpec
from microturn.model.engine_process import EngineCallError, EngineDied, EngineStartError, ProcessEngine
from microturn.model.slots import MAX_WAIT_BIAS_OFFSET, SamplingParams, SlotInput

TURNS = 6


@pytest.fixture(scope="module")
def remote() -> Iterator[ProcessEngine]:
    engine = process_engine(4)
    yield engine
    engine.close()


# per-tick row controls by turn: held and taken turns, muted rows (one of two, then both), a refused offset
CONTROLS_B = {0: {"wait_bias_offset": MAX_WAIT_BIAS_OFFSET}, 1: {"audio_out": False},
              2: {"audio_out": False, "wait_bias_offset": -MAX_WAIT_BIAS_OFFSET}, 5: {"audio_out": False}}
CONTROLS_C = {1: {"wait_bias_offset": -20.0}, 3: {"wait_bias_offset": float("nan")}, 5: {"audio_out": False}}


def _script(engine, turns: int) -> tuple[list[dict], tuple[int, int, int]]:
    """Joins, a leave that moves a row, a camera frame, text-in, forced text and row controls: every
    kind of input. -> each turn's outputs, and the slots (a, b, c)."""
    rng = np.random.default_rng(7)
    sp = engine.tokenizer.special
    a = engine.join("first", SamplingParams(seed=1))
    b = engine.join("second", SamplingParams(seed=2, text_temperature=0.0))
    c = engine.join("third", SamplingParams(seed=3))
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    seen = []
    for t in range(turns):
        if t == 2:
            engine.leave(a)  # the last row (c) moves into a's place
        speech = (rng.standard_normal(3200) * 0.1).astype(np.float32)
        inputs = {
            b: SlotInput(audio=speech, image=image if t == 1 else None,
                         text_in=[sp.SRC_USER, *b"hi"] if t == 3 else [], **CONTROLS_B.get(t, {})),
            c: SlotInput(audio=np.zeros(3200, np.float32), force_text_out=[sp.EPAD] if t == 4 else [],
                         **CONTROLS_C.get(t, {})),
        }
        if t < 2:
            inputs[a] = SlotInput(audio=np.full(3200, np.nan, np.float32))  # refused as that slot's error
        seen.append(engine.step(inputs))
    for slot in (b, c):
        engine.leave(slot)
    return seen, (a, b, c)


def test_outputs_are_bit_identical_to_the_in_process_engine(remote):
    local = warm_engine(4)
    (there, slots), (here, _) = _script(remote, TURNS), _script(local, TURNS)
    _, b, c = slots
    pad = remote.tokenizer.special.PAD
    assert here[0][b].text_tokens == [pad] * len(here[0][b].text_tokens)  # held by its offset
    assert not here[1][b].audio.any() and here[1][c].audio.any()  # one row muted, the other voiced
    assert not here[5][b].audio.any() and not here[5][c].audio.any()
    assert "wait_bias_offset" in here[3][c].error
    for turn_there, turn_here in zip(there, here, strict=True):
        assert turn_there.keys() == turn_here.keys()
        for slot, out in turn_here.items():
            other = turn_there[slot]
            assert np.array_equal(other.audio, out.audio)
            assert (other.text_tokens, other.heard_tokens, other.turn_index, other.text, other.error) == (
                out.text_tokens, out.heard_tokens, out.turn_index, out.text, out.error)
    assert remote.rows == 0


def test_a_refused_request_leaves_the_engine_serving(remote):
    slot = remote.join()
    with pytest.raises(EngineCallError, match="move"):
        remote._request(("move", 99, 0), remote.call_timeout_s)  # a row the engine does not have
    assert remote.step({})[slot].turn_index == 0
    remote.leave(slot)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_engine_raises_engine_died_until_restarted(remote, sig):
    slot = remote.join()
    remote.step({})
    old = remote.pid
    os.kill(old, sig)
    started = time.monotonic()
    with pytest.raises(EngineDied):
        remote.step({})
    assert time.monotonic() - started < remote.call_timeout_s + 3.0
    assert remote.rows == 0 and not remote.alive
    with pytest.raises(EngineDied):
        remote.join()
    remote.leave(slot)  # its row went with the engine: nothing to give back, nothing raised
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)
    remote.restart()
    assert remote.pid != old and remote.rows == 0
    slot = remote.join()
    assert remote.step({})[slot].turn_index == 0
    remote.leave(slot)


def test_a_bad_checkpoint_fails_start_with_the_reason(tmp_path):
    spec = EngineSpec(checkpoint=str(tmp_path / "missing"), preset="tiny", seed=0, device="cpu", dtype="auto",
                      max_slots=1, threads=1)
    engine = ProcessEngine(spec)
    with pytest.raises(EngineStartError, match="missing"):
        engine.start()
    assert engine.pid is None


def test_the_server_process_does_not_import_torch():
    code = ("import sys; import microturn.server.app, microturn.server.cli, microturn.model.engine_process; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
