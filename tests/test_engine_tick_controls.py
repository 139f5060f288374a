"""Per-tick row controls (SlotInput.wait_bias_offset, SlotInput.audio_out): what they change for their
row, that they change nothing for the other rows of the batch, and that bad values cost only their row."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from microturn.model.config import tiny
from microturn.model.engine import Engine
from microturn.model.slots import MAX_WAIT_BIAS_OFFSET, TURN_SAMPLES, SamplingParams, SlotInput
from microturn.model.tokenizer import ByteTokenizer
from microturn.model.transformer import build_model

TURNS = 4
PAD = ByteTokenizer().special.PAD
GREEDY = SamplingParams(0.0, 0, 0.0, 0)  # so a shifted PAD logit is the only thing that can differ


def _engine(max_slots: int = 4) -> Engine:
    return Engine(build_model(tiny(), seed=0), max_slots=max_slots, device="cpu", dtype=torch.float32)


def _speech(turns: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(TURN_SAMPLES) * 0.1).astype(np.float32) for _ in range(turns)]


def _run(
    controls: dict[str, dict | list[dict]], sampling: dict[str, SamplingParams] | None = None,
    engine: Engine | None = None,
) -> dict[str, list]:
    """Rows "a" and "b" joined in that order, each fed its own speech with `controls[name]` as extra
    SlotInput fields (the same every turn, or one dict per turn) -> each row's outputs per turn."""
    engine = engine or _engine()
    sampling = sampling or {}
    slots = {name: engine.join(name, sampling.get(name, SamplingParams(seed=i)))
             for i, name in enumerate("ab")}
    speech = {name: _speech(TURNS, i) for i, name in enumerate("ab")}
    outs: dict[str, list] = {name: [] for name in slots}
    for t in range(TURNS):
        step = engine.step({slot: SlotInput(audio=speech[name][t], **_at(controls.get(name, {}), t))
                            for name, slot in slots.items()})
        for name, slot in slots.items():
            outs[name].append(step[slot])
    return outs


def _at(controls: dict | list[dict], turn: int) -> dict:
    return controls[turn] if isinstance(controls, list) else controls


@cache
def _plain() -> dict[str, list]:
    """Both rows without controls: what every test compares against (outputs are not mutated)."""
    return _run({})


def _same(x: list, y: list) -> bool:
    return all(
        p.text_tokens == q.text_tokens and p.audio.tobytes() == q.audio.tobytes() and p.error == q.error
        for p, q in zip(x, y, strict=True)
    )


def test_a_big_wait_bias_offset_holds_the_turn_for_its_row_only() -> None:
    plain = _plain()
    held = _run({"a": {"wait_bias_offset": MAX_WAIT_BIAS_OFFSET}})
    assert any(tok != PAD for out in plain["a"] for tok in out.text_tokens)  # left alone, it speaks
    assert all(out.text_tokens == [PAD] * len(out.text_tokens) for out in held["a"])
    assert all(out.error is None for out in held["a"])
    assert _same(held["b"], plain["b"])  # the other row of the batch: bit for bit as without it


def test_a_negative_offset_takes_the_turn_a_session_bias_would_hold() -> None:
    patient = {"a": SamplingParams(0.8, 50, 0.8, 8, seed=0, wait_bias=40.0)}
    held = _run({}, patient)
    taken = _run({"a": {"wait_bias_offset": -MAX_WAIT_BIAS_OFFSET}}, patient)
    assert all(out.text_tokens == [PAD] * len(out.text_tokens) for out in held["a"])
    assert taken["a"][0].text_tokens[0] != PAD  # this turn's offset adds to the session's bias
    assert _same(taken["b"], held["b"])


def test_the_offset_moves_only_an_idle_rows_pad_logit_and_only_this_turn() -> None:
    """A twin engine stepped identically but for one turn's offset: in that turn the idle row's PAD
    logit moves by exactly the offset, a row with an open text span (not idle) is untouched, and
    the next turn (offset back to 0) runs on whatever the row sampled, with no bias left over."""
    engines = [_engine(), _engine()]
    for e in engines:
        e.trace = []
    sp = engines[0].tokenizer.special
    silence = np.zeros(TURN_SAMPLES, np.float32)
    for e, offset in zip(engines, (0.0, 7.5), strict=True):
        idle, talking = e.join("", GREEDY), e.join("", GREEDY)
        e.step({idle: SlotInput(silence, force_text_out=[sp.PAD] * 4),
                talking: SlotInput(silence, force_text_out=list(b"hey "))})  # a span opens: not idle
        e.step({idle: SlotInput(silence, wait_bias_offset=offset),
                talking: SlotInput(silence, wait_bias_offset=offset)})
        assert float(e.runner.rows.wait_offset[0]) == offset
        e.step({idle: SlotInput(silence, force_text_out=[sp.PAD] * 4), talking: SlotInput(silence)})
        assert float(e.runner.rows.wait_offset[0]) == 0.0
    base, shifted = (e.trace[1]["text_logits"][:, 0] for e in engines)  # (B, vocab) first text-out slot
    delta = shifted - base  # (B, vocab)
    assert delta[0, sp.PAD] == pytest.approx(7.5)
    assert not delta[0, : sp.PAD].any() and not delta[0, sp.PAD + 1 :].any()  # only PAD moved
    assert not delta[1].any()


def test_an_offset_out_of_range_is_refused_for_its_row_only() -> None:
    offsets = [MAX_WAIT_BIAS_OFFSET + 0.5, float("nan"), -float("inf"), "a lot"]  # one a turn
    assert len(offsets) == TURNS
    bad = _run({"a": [{"wait_bias_offset": x} for x in offsets]})
    for out, offset in zip(bad["a"], offsets, strict=True):
        assert out.error and "wait_bias_offset" in out.error, offset
        assert out.audio.shape == (TURN_SAMPLES,) and np.isfinite(out.audio).all()
    assert _same(bad["b"], _plain()["b"])
    edge = _run({"a": [{"wait_bias_offset": x} for x in (MAX_WAIT_BIAS_OFFSET, -MAX_WAIT_BIAS_OFFSET, 0, 1)]})
    assert all(out.error is None for out in edge["a"])  # the limit itself, and ints, are fine


def test_audio_out_must_be_a_bool() -> None:
    engine = _engine()
    bad, good = engine.join(), engine.join()
    silence = np.zeros(TURN_SAMPLES, np.float32)
    out = engine.step({bad: SlotInput(silence, audio_out="no"),  # type: ignore[arg-type]
                       good: SlotInput(silence, audio_out=np.bool_(0))})
    assert "audio_out" in out[bad].error and out[good].error is None and not out[good].audio.any()


def test_a_row_without_audio_out_is_not_vocoded_and_changes_nothing_else() -> None:
    engine = _engine()
    calls: list[int] = []
    decode_chunk = engine.runner.vocoder.decode_chunk

    def counted(logmel: torch.Tensor, state):
        calls.append(len(logmel))
        return decode_chunk(logmel, state)

    engine.runner.vocoder.decode_chunk = counted  # type: ignore[method-assign]
    plain = _plain()
    outs = _run({"a": {"audio_out": False}}, engine=engine)
    assert calls == [1] * TURNS  # only the voiced row went to the vocoder
    for muted, voiced in zip(outs["a"], plain["a"], strict=True):
        assert muted.audio.dtype == np.float32 and muted.audio.shape == (TURN_SAMPLES,)
        assert not muted.audio.any() and voiced.audio.any()
        # its audio tokens are still sampled and fed back: the conversation goes on as with audio on
        assert muted.text_tokens == voiced.text_tokens
    assert _same(outs["b"], plain["b"]) and all(out.audio.any() for out in plain["b"])

    a, b = engine.active_slots
    frames = engine.runner.voc_state.frames
    assert int(frames[engine.table.row(a)]) == 0 < int(frames[engine.table.row(b)])  # a's stream restarts
    silence = np.zeros(TURN_SAMPLES, np.float32)
    calls.clear()
    engine.step({a: SlotInput(silence, audio_out=False), b: SlotInput(silence, audio_out=False)})
    assert calls == []  # no voiced row: no vocoder call at all
    engine.step({a: SlotInput(silence), b: SlotInput(silence)})
    assert calls == [2]
    engine.step({a: SlotInput(silence), b: SlotInput(silence, audio_out=False)})
    engine.leave(a)  # b's row, muted last, moves into a's: its stream state moves with it
    assert int(frames[engine.table.row(b)]) == 0 and engine.step({})[b].audio.any()
