"""The engine's contract: streaming == offline, batch invariance, wrap-around, determinism."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from microturn.model.checkpoint import save_checkpoint
from microturn.model.config import tiny
from microturn.model.engine import Engine, EngineFull
from microturn.model.kv_cache import KVCache
from microturn.model.layout import (
    Turns,
    audio_in_hidden,
    embed_inputs,
    embed_outputs,
    embed_sequence,
    sequence_hidden,
    sequence_logits,
)
from microturn.model.row_state import RowState
from microturn.model.slot_table import SlotTable
from microturn.model.slots import TURN_SAMPLES, SamplingParams, SlotInput
from microturn.model.tokenizer import MAX_TASK_MARKER_BYTES, ByteTokenizer, TextOutDecoder
from microturn.model.transformer import build_model

INSTR = "You are a helpful voice assistant."


def _engine(cfg=None, max_slots: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> Engine:
    """fp32 by default: the contract's tolerances are fp32 ones (the served default may be bf16)."""
    return Engine(build_model(cfg or tiny(), seed=seed), max_slots=max_slots, device="cpu", dtype=dtype)


def _inputs(rng: np.random.Generator, speech: np.ndarray, turn: int, with_text: bool = True) -> SlotInput:
    start = (turn * TURN_SAMPLES) % max(1, len(speech) - TURN_SAMPLES)
    audio = speech[start : start + TURN_SAMPLES].astype(np.float32)
    text = list(b"hi!") if with_text and turn % 3 == 1 else []
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) if turn % 4 == 0 else None
    return SlotInput(audio=audio, image=image, text_in=text, text_in_background=turn % 2 == 0)


def _row_turns(trace: list[dict], slot: int) -> tuple[Turns, torch.Tensor, torch.Tensor]:
    """Gather one slot's micro-turns (and the engine's logits for them) out of a trace."""
    picked = []
    for step in trace:
        if slot in step["slots"]:
            picked.append((step, step["slots"].index(slot)))

    def stack(key: str) -> torch.Tensor:
        return torch.stack([s[key][r] for s, r in picked])[None]

    turns = Turns(**{f.name: stack(f.name) for f in dataclasses.fields(Turns)})
    return turns, stack("text_logits")[0], stack("audio_logits")[0]


def _offline(engine: Engine, instructions: str, turns: Turns) -> tuple[torch.Tensor, torch.Tensor]:
    tok = engine.tokenizer
    prefix = torch.tensor([[tok.special.INSTR, *tok.encode(instructions)]])
    with torch.no_grad():
        text, audio, _ = sequence_logits(engine.model, prefix, turns)
    return text[0], audio[0]


@pytest.mark.parametrize("ear", [0, 8], ids=["plain", "with-ear"])
def test_streaming_equals_offline(speech_16k: np.ndarray, ear: int) -> None:
    engine = _engine(dataclasses.replace(tiny(), ear_channels=ear))
    if ear:  # a grown ear starts at zero: give it weights so that it counts
        torch.nn.init.normal_(engine.model.ear.proj.weight, std=0.02)
    engine.trace = []
    slot = engine.join(INSTR, SamplingParams(seed=3))
    rng = np.random.default_rng(0)
    for t in range(8):
        engine.step({slot: _inputs(rng, speech_16k, t)})
    turns, text_stream, audio_stream = _row_turns(engine.trace, slot)
    text_ref, audio_ref = _offline(engine, INSTR, turns)
    assert torch.allclose(text_stream, text_ref, atol=1e-4), (text_stream - text_ref).abs().max()
    assert torch.allclose(audio_stream, audio_ref, atol=1e-4), (audio_stream - audio_ref).abs().max()


def test_sequence_embedding_keeps_rows_and_turns_apart(speech_16k: np.ndarray) -> None:
    """embed_sequence embeds all B*N turns at once: each row must equal that row embedded turn by turn."""
    engine = _engine()
    rng = np.random.default_rng(1)
    rows = []
    for b in range(2):
        engine.trace = []
        slot = engine.join(INSTR, SamplingParams(seed=b))
        for t in range(3):
            engine.step({slot: _inputs(rng, speech_16k, t + 5 * b)})
        rows.append(_row_turns(engine.trace, slot)[0])
        engine.leave(slot)
    both = Turns(**{f.name: torch.cat([getattr(r, f.name) for r in rows]) for f in dataclasses.fields(Turns)})
    prefix = torch.tensor([[engine.tokenizer.special.INSTR, *engine.tokenizer.encode(INSTR)]])
    with torch.no_grad():
        x = embed_sequence(engine.model, prefix.expand(2, -1), both)[0]
        for b, row in enumerate(rows):
            alone = [engine.model.embed_text(prefix)]
            model = engine.model
            for t in range(3):
                alone.append(embed_inputs(model, row.ctrl[:, t], row.patches[:, t], row.patch_idx[:, t],
                                          row.audio_in[:, t], row.text_in[:, t], row.source[:, t]))
                alone.append(embed_outputs(model, row.text_out[:, t], row.audio_out[:, t]))
            assert torch.allclose(x[b], torch.cat(alone, dim=1)[0], atol=1e-5)


def test_wrap_around_matches_sliding_window_reference(speech_16k: np.ndarray) -> None:
    cfg = dataclasses.replace(tiny(), window=64, prefix_len=16)
    engine = _engine(cfg)
    engine.trace = []
    instructions = "short rules."
    slot = engine.join(instructions)
    rng = np.random.default_rng(1)
    turns_needed = 3 * cfg.window // cfg.positions_per_turn + 2  # three windows long
    for t in range(turns_needed):
        engine.step({slot: _inputs(rng, speech_16k, t)})
    turns, text_stream, audio_stream = _row_turns(engine.trace, slot)
    assert turns.ctrl.shape[1] * cfg.positions_per_turn > 3 * cfg.window
    text_ref, audio_ref = _offline(engine, instructions, turns)
    assert torch.allclose(text_stream, text_ref, atol=1e-4), (text_stream - text_ref).abs().max()
    assert torch.allclose(audio_stream, audio_ref, atol=1e-4), (audio_stream - audio_ref).abs().max()


def _run_alone(speech: np.ndarray, turns: int, dtype: torch.dtype = torch.float32) -> list:
    engine = _engine(dtype=dtype)
    slot = engine.join(INSTR, SamplingParams(seed=11))
    rng = np.random.default_rng(5)
    return [engine.step({slot: _inputs(rng, speech, t)})[slot] for t in range(turns)]


def test_batch_invariance(speech_16k: np.ndarray) -> None:
    n_turns = 10
    alone = _run_alone(speech_16k, n_turns)

    engine = _engine()
    others: list[int] = [engine.join(f"other {i}", SamplingParams(seed=100 + i)) for i in range(3)]
    slot = engine.join(INSTR, SamplingParams(seed=11))
    rng, other_rng = np.random.default_rng(5), np.random.default_rng(9)
    shared, peak = [], 0
    for t in range(n_turns):
        # others join and leave at other times, so the slot's row moves around the batch
        if t == 2:
            engine.leave(others.pop(0))
        if t in (3, 5, 6):
            others.append(engine.join("late joiner", SamplingParams(seed=200 + t)))
        if t == 7:
            engine.leave(others.pop(1))
        batch = {o: _inputs(other_rng, speech_16k[::-1].copy(), t) for o in others}
        batch[slot] = _inputs(rng, speech_16k, t)
        shared.append(engine.step(batch)[slot])
        assert len(engine.active_slots) == len(others) + 1
        peak = max(peak, len(engine.active_slots))
    assert peak >= 5
    for a, b in zip(alone, shared, strict=True):
        assert a.text_tokens == b.text_tokens
        assert np.allclose(a.audio, b.audio, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_determinism_same_seed_same_bytes(speech_16k: np.ndarray, dtype: torch.dtype) -> None:
    first = [o.audio.tobytes() for o in _run_alone(speech_16k, 5, dtype)]
    second = [o.audio.tobytes() for o in _run_alone(speech_16k, 5, dtype)]
    assert first == second


def test_different_seeds_differ(speech_16k: np.ndarray) -> None:
    engine = _engine()
    a = engine.join(INSTR, SamplingParams(seed=1))
    b = engine.join(INSTR, SamplingParams(seed=2))
    rng = np.random.default_rng(0)
    inp = _inputs(rng, speech_16k, 0)
    out = engine.step({a: inp, b: inp})
    assert out[a].audio.tobytes() != out[b].audio.tobytes()


def test_bad_row_input_isolated(speech_16k: np.ndarray) -> None:
    engine = _engine()
    good, bad = engine.join(INSTR), engine.join(INSTR)
    rng = np.random.default_rng(0)
    garbage = engine.join(INSTR)
    out = engine.step({
        good: _inputs(rng, speech_16k, 0),
        bad: SlotInput(audio=np.full(TURN_SAMPLES, np.nan, np.float32), text_in=[999999]),
        garbage: SlotInput(audio=["not", "audio"], text_in=["x"]),  # type: ignore[arg-type]
    })
    assert out[good].error is None
    assert out[bad].error and "audio" in out[bad].error
    assert out[garbage].error
    assert out[bad].audio.shape == (TURN_SAMPLES,)
    assert np.isfinite(out[good].audio).all() and np.isfinite(out[bad].audio).all()


def test_join_leave_full_and_reuse() -> None:
    engine = _engine(max_slots=2)
    a, b = engine.join(), engine.join()
    with pytest.raises(EngineFull):
        engine.join()
    engine.leave(a)
    c = engine.join()
    assert c == a and sorted(engine.active_slots) == sorted([b, c])
    out = engine.step({})
    assert set(out) == {b, c} and out[c].turn_index == 0 and out[b].turn_index == 0


def test_rejoined_slot_matches_fresh_session(speech_16k: np.ndarray) -> None:
    fresh = _run_alone(speech_16k, 3)
    engine = _engine()
    old = engine.join("something else entirely", SamplingParams(seed=4))
    rng = np.random.default_rng(2)
    for t in range(4):
        engine.step({old: _inputs(rng, speech_16k, t)})
    engine.leave(old)
    slot = engine.join(INSTR, SamplingParams(seed=11))
    rng = np.random.default_rng(5)
    reused = [engine.step({slot: _inputs(rng, speech_16k, t)})[slot] for t in range(3)]
    for a, b in zip(fresh, reused, strict=True):
        assert a.text_tokens == b.text_tokens
        assert np.allclose(a.audio, b.audio, atol=1e-5)


def test_forced_text_out_goes_through_the_model(speech_16k: np.ndarray) -> None:
    engine = _engine()
    engine.trace = []
    slot = engine.join(INSTR)
    sp = engine.tokenizer.special
    forced = [*b"ab", sp.TASK_START, *b"c"]
    rng = np.random.default_rng(0)
    inp = _inputs(rng, speech_16k, 0)
    inp.force_text_out = forced
    out = engine.step({slot: inp})[slot]
    assert out.text_tokens == forced and out.text == "ab"  # "c" opens a task marker: not printable
    # the forced tokens are part of the sequence the model conditions on: offline agrees
    engine.step({slot: _inputs(rng, speech_16k, 1)})
    turns, text_stream, _ = _row_turns(engine.trace, slot)
    assert turns.text_out[0, 0].tolist() == forced
    text_ref, _ = _offline(engine, INSTR, turns)
    assert torch.allclose(text_stream, text_ref, atol=1e-4)


def test_heard_tokens_are_the_offline_reading_of_the_audio_in(speech_16k: np.ndarray) -> None:
    """What the engine says it heard is the text head's greedy reading of the audio-in positions,
    the same positions and head the --heard-weight CTC loss trains (training/heard.py)."""
    engine = _engine()
    engine.trace = []
    slot = engine.join(INSTR, SamplingParams(seed=3))
    rng = np.random.default_rng(2)
    heard = [engine.step({slot: _inputs(rng, speech_16k, t)})[slot].heard_tokens for t in range(6)]
    turns, _, _ = _row_turns(engine.trace, slot)
    tok = engine.tokenizer
    prefix = torch.tensor([[tok.special.INSTR, *tok.encode(INSTR)]])
    with torch.no_grad():
        h, _ = sequence_hidden(engine.model, prefix, turns)
        ref = engine.model.text_logits(audio_in_hidden(engine.config, h)).argmax(-1)  # (1, N*A)
    assert ref.view(6, engine.config.audio_tokens).tolist() == heard


def test_engine_hears_where_the_checkpoint_was_trained_to(tmp_path) -> None:
    cfg = tiny()
    model = build_model(cfg, seed=0)
    for name, weight in (("hears", 0.1), ("deaf", 0.0)):
        save_checkpoint(tmp_path / name, model, cfg, extra={"recipe": {"heard_weight": weight}})
    assert Engine.from_checkpoint(tmp_path / "hears", max_slots=1, device="cpu").hears
    assert not Engine.from_checkpoint(tmp_path / "deaf", max_slots=1, device="cpu").hears
    assert not _engine(max_slots=1).hears


def test_wait_bias_holds_or_takes_the_turn_only_while_idle(speech_16k: np.ndarray) -> None:
    """SamplingParams.wait_bias shifts text-out toward PAD (silence) while the model is idle, and
    leaves it alone once the model has started a text span (until its EPAD)."""
    engine = _engine()
    sp = engine.tokenizer.special
    wait = engine.join(INSTR, SamplingParams(0.0, 0, 0.0, 0, wait_bias=1e4))
    eager = engine.join(INSTR, SamplingParams(0.0, 0, 0.0, 0, wait_bias=-1e4))
    rng = np.random.default_rng(3)
    for t in range(4):
        out = engine.step({s: _inputs(rng, speech_16k, t, with_text=False) for s in (wait, eager)})
        assert out[wait].text_tokens == [sp.PAD] * 4, t
        if t == 0:
            assert out[eager].text_tokens[0] != sp.PAD  # idle at join: it must start a span
    idle = engine.runner.rows.idle
    row = engine.table.row(wait)
    silence = np.zeros(TURN_SAMPLES, np.float32)
    engine.step({wait: SlotInput(audio=silence, force_text_out=list(b"hey "))})
    assert not idle[row]  # a span is open: the bias no longer applies
    engine.step({wait: SlotInput(audio=silence, force_text_out=[ord("i"), sp.EPAD, sp.PAD, sp.PAD])})
    assert idle[row]
    assert engine.step({wait: SlotInput(audio=silence)})[wait].text_tokens == [sp.PAD] * 4


def test_checkpoint_carries_its_calibrated_wait_bias(tmp_path) -> None:
    cfg = tiny()
    save_checkpoint(tmp_path / "run", build_model(cfg, seed=0), cfg)
    from microturn.cli import main as cli_main

    out = tmp_path / "shipped"
    argv = ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--wait-bias", "1.5"]
    assert cli_main(argv) == 0
    engine = Engine.from_checkpoint(out, max_slots=2, device="cpu")
    assert engine.wait_bias_default == 1.5
    slot = engine.join("", SamplingParams(wait_bias=-0.5))  # a session's offset adds to it
    assert float(engine.runner.rows.wait_bias[engine.table.row(slot)]) == 1.0


def _distinct_rows(state: RowState) -> None:
    """Fill every field with row-specific values, none of them what a reset writes."""
    for f in dataclasses.fields(state):
        t = getattr(state, f.name)
        if t.dtype == torch.bool:
            t.fill_(not f.metadata.get("fresh", False))
        else:
            row = torch.arange(1, t.shape[0] + 1).view(-1, *[1] * (t.dim() - 1))
            t.copy_((row * 10 + torch.zeros_like(t, dtype=torch.long)).to(t.dtype))


def test_row_state_reset_and_move_cover_every_field() -> None:
    cfg = tiny()
    state = RowState.allocate(cfg, 4, torch.float32, torch.device("cpu"))
    storage = {f.name: getattr(state, f.name).data_ptr() for f in dataclasses.fields(state)}
    fresh = RowState.allocate(cfg, 4, torch.float32, torch.device("cpu"))
    _distinct_rows(state)
    before = {f.name: getattr(state, f.name).clone() for f in dataclasses.fields(state)}

    state.move_row(3, 1)
    for f in dataclasses.fields(state):
        t, old = getattr(state, f.name), before[f.name]
        assert torch.equal(t[1], old[3]), f.name
        assert torch.equal(t[[0, 2, 3]], old[[0, 2, 3]]), f.name

    moved = {f.name: getattr(state, f.name).clone() for f in dataclasses.fields(state)}
    state.reset(torch.tensor([True, False, True, False]), first_pos=cfg.prefix_len)
    for f in dataclasses.fields(state):
        t = getattr(state, f.name)
        if f.name == "next_pos":
            expect = torch.full_like(fresh.next_pos[[0, 2]], cfg.prefix_len)
        elif f.metadata.get("kept"):
            expect = moved[f.name][[0, 2]]
        else:
            expect = getattr(fresh, f.name)[[0, 2]]
        assert torch.equal(t[[0, 2]], expect), f.name  # a row that has not run a turn
        assert torch.equal(t[[1, 3]], moved[f.name][[1, 3]]), f.name
        assert t.data_ptr() == storage[f.name], f.name  # in place: captured graphs read the same storage


def test_runner_moves_and_resets_cache_and_stream_rows_with_the_row_state() -> None:
    engine = _engine(max_slots=3)
    runner = engine.runner
    a, b, c = (engine.join(INSTR, SamplingParams(seed=s)) for s in (1, 2, 3))
    engine.step({})
    last = engine.table.row(c)
    cache: KVCache = runner.cache
    kept = (cache.cell_pos[last].clone(), cache.k[0][last].clone(), runner.dmel_state.carry[last].clone(),
            runner.voc_state.tail[last].clone(), runner.voc_state.frames[last].clone())
    engine.leave(a)  # c's row moves into a's hole
    assert engine.table.row(c) == 0
    moved = (cache.cell_pos[0], cache.k[0][0], runner.dmel_state.carry[0], runner.voc_state.tail[0],
             runner.voc_state.frames[0])
    for want, got in zip(kept, moved, strict=True):
        assert torch.equal(want, got)
    assert int(runner.rows.seed[0]) == 3
    d = engine.join("", SamplingParams(seed=4))  # on the vacated row: nothing of the old row survives
    row = engine.table.row(d)
    assert row == 2 and int(runner.rows.turn[row]) == 0 and not runner.rows.has_carry[row]
    assert int(runner.voc_state.frames[row]) == 0 and not runner.dmel_state.carry[row].any()
    assert (cache.cell_pos[row, cache.prefix_len :] == -1).all()
    assert sorted(engine.active_slots) == sorted([b, c, d])


def test_slot_table_rows_stay_contiguous_through_join_leave_rejoin() -> None:
    """A mirror of per-row state that follows only the (src, dst) moves `leave` returns stays equal to
    the table's rows: what the runner relies on."""
    table = SlotTable(tiny(), 4, ByteTokenizer(), patchify=lambda image: image)
    mirror: list[int] = []  # row -> slot, moved like the runner's per-row state
    rng = random.Random(0)
    for _ in range(300):
        if mirror and (len(mirror) == 4 or rng.random() < 0.5):
            slot = rng.choice(mirror)
            move = table.leave(slot)
            if move is not None:
                src, dst = move
                assert src == len(mirror) - 1 and mirror[dst] == slot
                mirror[dst] = mirror[src]
            else:
                assert mirror[-1] == slot
            mirror.pop()
        else:
            free = min(set(range(4)) - set(mirror))
            slot, row = table.join()
            assert (slot, row) == (free, len(mirror))  # the lowest free slot, on the first free row
            mirror.append(slot)
        assert table.slots == mirror and len(table) == len(mirror)
        assert all(table.row(s) == r for r, s in enumerate(mirror))
    while len(table) < 4:
        table.join()
    with pytest.raises(EngineFull):
        table.join()


def test_slot_table_packs_rows_in_row_order() -> None:
    cfg = tiny()
    patches = np.full((4, cfg.patch_dim), 0.5, np.float32)
    table = SlotTable(cfg, 3, ByteTokenizer(), patchify=lambda image: patches)
    a, b, c = (table.join()[0] for _ in range(3))
    table.leave(a)  # c moves to row 0
    image = np.zeros((8, 8, 3), np.uint8)
    audio = np.full(TURN_SAMPLES, 0.25, np.float32)
    batch, controls, errors = table.pack({
        c: SlotInput(audio=audio, image=image, text_in=[1, 2], text_in_background=True, force_text_out=[7],
                     wait_bias_offset=-3.0, audio_out=False),
        b: SlotInput(audio=np.zeros(5, np.float32), wait_bias_offset=9.0, audio_out=False),
    })
    assert errors[0] is None and "audio" in errors[1]
    # a refused row runs with the default controls, as with silence
    assert controls.wait_bias_offset.tolist() == [-3.0, 0.0] and controls.audio_out.tolist() == [False, True]
    assert (batch.audio[0] == 0.25).all() and not batch.audio[1].any()
    assert batch.text_in[0].tolist() == [1, 2] + [table.tokenizer.special.PAD] * (cfg.text_in_slots - 2)
    assert batch.source[:, 0].tolist() == [1, 0] and batch.forced[0, 0] == 7 and (batch.forced[1] == -1).all()
    assert batch.image_rows == [0] and batch.images.shape == (1, 4, cfg.patch_dim)


def _decode_all(chunks: list[list[int]]) -> tuple[str, list[str]]:
    decoder = TextOutDecoder(ByteTokenizer())
    fed = [decoder.feed(c) for c in chunks]
    return "".join(d.text for d in fed), [t for d in fed for t in d.task_texts]


def test_task_marker_text_stays_out_of_the_printable_text() -> None:
    sp = ByteTokenizer().special
    decoder = TextOutDecoder(ByteTokenizer())
    first = decoder.feed([*b"one moment.", sp.TASK_START, *b"what ti"])
    assert (first.text, first.task_texts) == ("one moment.", [])
    second = decoder.feed([*b"me is it", sp.TASK_END, sp.EPAD, *b"it is 3:36."])
    assert (second.text, second.task_texts) == ("it is 3:36.", ["what time is it"])
    # a character split across calls, or around a whole marker, comes out once, whole
    euro, nai = "€".encode(), "naïve".encode()
    assert _decode_all([[euro[0]], [euro[1], sp.PAD], [euro[2], *b"!"]]) == ("€!", [])
    assert _decode_all([[*b"caf", 0xC3], [sp.TASK_START, *nai[:3]], [*nai[3:], sp.TASK_END, 0xA9]]) == (
        "café", ["naïve"])


def test_a_runaway_marker_is_no_task_and_no_text() -> None:
    sp = ByteTokenizer().special
    runaway = [sp.TASK_START, *(b"a" * (MAX_TASK_MARKER_BYTES + 1))]
    # past the cap, its bytes stay out up to the TASK_END that closes it
    assert _decode_all([[*b"hm ", *runaway[:300]], runaway[300:], [*b"bbb", sp.TASK_END, *b"ok"]]) == (
        "hm ok", [])
    # never closed: the model's EPAD ends it (its text span is over), so is a new marker
    assert _decode_all([runaway, [*b"zz", sp.EPAD, *b"hi"]]) == ("hi", [])
    assert _decode_all([runaway, [sp.TASK_START, *b"t", sp.TASK_END, *b"hi"]]) == ("hi", ["t"])
    # within the cap, a marker's EPAD is its content's business: it stays a marker
    assert _decode_all([[sp.TASK_START, *b"ab", sp.EPAD, *b"c", sp.TASK_END, *b"d"]]) == ("d", ["abc"])


def test_printable_text_is_the_bytes_outside_markers_however_the_stream_is_cut() -> None:
    sp = ByteTokenizer().special
    rng = random.Random(4)
    for _ in range(50):
        ids, outside, tasks = [], bytearray(), []
        for _ in range(rng.randint(1, 6)):
            said = rng.choice(["hé ", "ça va? ", "日本 ", "ok. "]).encode()
            ids += [*said, sp.PAD]
            outside += said
            if rng.random() < 0.5:
                task = rng.choice(["what time is ít", "2+2", "€ rate"])
                ids += [sp.TASK_START, *task.encode(), sp.TASK_END]
                tasks.append(task)
        cuts = sorted(rng.sample(range(1, len(ids)), min(4, len(ids) - 1)))
        chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        assert _decode_all(chunks) == (outside.decode(), tasks)
