"""One session never affects another: hostile input from one client, a bystander streaming beside it.

Real uvicorn on loopback, real WebSocket clients, the tiny engine. Each test checks the sender got
its `error` (or was closed alone), the bystander's micro-turns kept coming with contiguous seq,
and the engine steps exactly one row per live session.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
import websockets
from helpers.realserver import ServerThread, collect, warm_engine

from microturn.model.engine import Engine
from microturn.server import protocol as p
from microturn.server.background.backends.local import find_expression
from microturn.server.session import Session
from microturn.server.settings import ServerSettings

MAX_SLOTS = 4
LONE_SURROGATE = r"bad \ud800 text"  # a JSON escape: valid JSON text, but no UTF-8 encoding exists
WINDOW_S = 2.0  # how long the bystander is watched while the other client misbehaves
ROWS_SETTLE_S = 5.0  # leaves are queued to the tick thread; the row count is polled this long


@pytest.fixture(scope="module")
def engine() -> Engine:
    return warm_engine(MAX_SLOTS)


@pytest.fixture
def server(engine) -> Iterator[ServerThread]:
    with ServerThread(ServerSettings(max_sessions=2, task_events=True), engine) as srv:
        yield srv


def _sessions(server: ServerThread) -> list[Session]:
    return [c.session for c in server.app.state.server.connections]


def _assert_contiguous(frames: list[p.Frame]) -> None:
    assert frames, "the bystander got no audio"
    seqs = [f.seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def _settled_rows(server: ServerThread, engine: Engine, expected: int) -> tuple[int, int]:
    """(engine rows, live sessions) once both are `expected`, or as they are after ROWS_SETTLE_S.

    Waiting for the expected count, not for any agreement: a client's close handshake completes
    before the server's handler sees the disconnect, so rows == live == 1 can still hold then."""
    deadline = time.monotonic() + ROWS_SETTLE_S
    while True:
        rows, live = len(engine.table), len(server.app.state.server.connections)
        settled = rows == live == expected and len(engine.active_slots) == rows
        if settled or time.monotonic() > deadline:
            return rows, live
        await asyncio.sleep(0.05)


async def _ready(ws) -> None:
    await collect(ws, 5, until=lambda e: e["type"] == "session.created")


async def _error_for(ws, event_id: str, seconds: float = 5.0) -> dict:
    _, events = await collect(ws, seconds, until=lambda e: e["type"] == "error")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert errors and errors[0]["event_id"] == event_id, errors
    return errors[0]


async def test_lone_surrogate_in_function_call_output_is_refused(server, engine):
    sp = engine.tokenizer.special
    order = {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}
    tool = {"type": "function", "name": "lookup_order", "behavior": "background", "parameters": order}
    async with websockets.connect(server.ws_url) as sender, \
            websockets.connect(server.ws_url + "?audio=binary") as bystander:
        await _ready(sender)
        await _ready(bystander)
        await sender.send(json.dumps({"type": "session.update", "session": {"tools": [tool]}}))
        await collect(sender, 0.5)
        mine = next(s for s in _sessions(server) if s.tools)
        mine.script_text_out([sp.TASK_START, *b"lookup_order: A17", sp.TASK_END])
        asked = "response.function_call_arguments.done"
        _, events = await collect(sender, 15, until=lambda e: e["type"] == asked)
        call_id = events[-1]["call_id"]

        watch = asyncio.create_task(collect(bystander, WINDOW_S))
        bad = {"type": "function_call_output", "call_id": call_id, "output": "OUT"}
        await sender.send(json.dumps({"type": "conversation.item.create", "event_id": "surrogate",
                                      "item": bad}).replace('"OUT"', f'"{LONE_SURROGATE}"'))
        error = await _error_for(sender, "surrogate")
        assert error["code"] == "invalid_event" and error["param"] == "item.output"
        # the call is still waiting, and the sender's session still works: a good answer finishes it
        good = {"type": "function_call_output", "call_id": call_id, "output": "shipped"}
        await sender.send(json.dumps({"type": "conversation.item.create", "event_id": "ok", "item": good}))
        _, events = await collect(sender, 15, until=lambda e: e["type"] == "task.done")
        assert events[-1]["type"] == "task.done" and events[-1]["result"]["output"] == "shipped"
        frames, _ = await watch
        _assert_contiguous(frames)


@pytest.mark.parametrize("event", [
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "OUT"}]}},
    {"type": "session.update", "session": {"instructions": "OUT"}},
], ids=["input_text", "instructions"])
async def test_lone_surrogate_text_gets_invalid_event_and_the_session_lives(server, engine, event):
    async with websockets.connect(server.ws_url + "?audio=binary") as sender, \
            websockets.connect(server.ws_url + "?audio=binary") as bystander:
        await _ready(sender)
        await _ready(bystander)
        watch = asyncio.create_task(collect(bystander, WINDOW_S))
        text = json.dumps({**event, "event_id": "surrogate"})
        await sender.send(text.replace('"OUT"', f'"{LONE_SURROGATE}"'))
        error = await _error_for(sender, "surrogate")
        assert error["code"] == "invalid_event"
        frames, _ = await collect(sender, 1.0)
        _assert_contiguous(frames)  # the sender still streams
        frames, _ = await watch
        _assert_contiguous(frames)
        assert await _settled_rows(server, engine, 2) == (2, 2)


@pytest.mark.parametrize("stage", ["take_input", "deliver"])
async def test_a_failing_tick_stage_closes_only_its_session(server, engine, monkeypatch, stage):
    """A bug in one session's input preparation or delivery: that session is closed 1011, the
    rest of the batch keeps its micro-turns, and the bad state does not fail again every tick."""
    original = getattr(Session, stage)
    calls = []

    def failing(self, *args):
        if self.instructions == "explode":
            calls.append(stage)
            raise RuntimeError(f"{stage} blew up")
        return original(self, *args)

    monkeypatch.setattr(Session, stage, failing)
    async with websockets.connect(server.ws_url + "?audio=binary") as sender, \
            websockets.connect(server.ws_url + "?audio=binary") as bystander:
        await _ready(sender)
        await _ready(bystander)
        watch = asyncio.create_task(collect(bystander, WINDOW_S))
        await sender.send(json.dumps({"type": "session.update", "session": {"instructions": "explode"}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                message = await asyncio.wait_for(sender.recv(), 5)
                if isinstance(message, str) and json.loads(message)["type"] == "error":
                    assert json.loads(message)["error"]["code"] == "internal_error"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        frames, _ = await watch
        _assert_contiguous(frames)
        assert await _settled_rows(server, engine, 1) == (1, 1)
        assert len(calls) == 1, calls  # failed once, then was out of the batch


async def test_out_of_range_numbers_are_refused_and_hold_no_engine_row(server, engine):
    """Twice over the int64 seed, a NaN temperature: each an invalid_event, no row leaked, and a
    two-session server still admits two new sessions afterwards."""
    bad = [
        ("seed1", '{"type":"session.update","event_id":"seed1","session":{"seed":18446744073709551616}}'),
        ("seed2", '{"type":"session.update","event_id":"seed2","session":{"seed":-18446744073709551616}}'),
        ("nan", '{"type":"session.update","event_id":"nan","session":{"temperature":NaN}}'),
        ("inf", '{"type":"session.update","event_id":"inf","session":{"temperature":Infinity}}'),
        ("timeout", '{"type":"task.create","event_id":"timeout","task":{"input":"2+2","timeout_s":1e400}}'),
    ]
    async with websockets.connect(server.ws_url + "?audio=binary") as sender, \
            websockets.connect(server.ws_url + "?audio=binary") as bystander:
        await _ready(sender)
        await _ready(bystander)
        watch = asyncio.create_task(collect(bystander, WINDOW_S))
        for event_id, text in bad:
            await sender.send(text)
            assert (await _error_for(sender, event_id))["code"] == "invalid_event"
        frames, _ = await collect(sender, 1.0)
        _assert_contiguous(frames)
        frames, _ = await watch
        _assert_contiguous(frames)
        assert await _settled_rows(server, engine, 2) == (2, 2)
        await sender.send('{"type":"session.update","event_id":"ok","session":{"seed":9223372036854775807}}')
        _, events = await collect(sender, 5, until=lambda e: e["type"] in ("session.updated", "error"))
        assert events[-1]["type"] == "session.updated" and events[-1]["session"]["seed"] == 2**63 - 1
    assert await _settled_rows(server, engine, 0) == (0, 0)
    async with websockets.connect(server.ws_url) as a, websockets.connect(server.ws_url) as b:
        await _ready(a)
        await _ready(b)
        assert await _settled_rows(server, engine, 2) == (2, 2)


async def test_a_failed_rejoin_gives_its_row_back(server, engine, monkeypatch):
    """The engine fails part way through a join (after the slot is taken): the row is given back,
    the session is closed cleanly, and its slot is free for the next client."""
    original = engine.set_instructions

    def set_instructions(slot: int, instructions: str) -> None:
        if instructions == "cannot prefill":
            raise RuntimeError("prefill failed")
        original(slot, instructions)

    monkeypatch.setattr(engine, "set_instructions", set_instructions)
    async with websockets.connect(server.ws_url + "?audio=binary") as sender, \
            websockets.connect(server.ws_url + "?audio=binary") as bystander:
        await _ready(sender)
        await _ready(bystander)
        watch = asyncio.create_task(collect(bystander, WINDOW_S))
        update = {"type": "session.update", "session": {"instructions": "cannot prefill"}}
        await sender.send(json.dumps(update))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(sender.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        frames, _ = await watch
        _assert_contiguous(frames)
        assert await _settled_rows(server, engine, 1) == (1, 1)
        async with websockets.connect(server.ws_url) as late:
            await _ready(late)  # admitted: the failed session's slot was given back
            assert await _settled_rows(server, engine, 2) == (2, 2)


async def test_huge_task_input_is_refused_and_the_bystander_keeps_streaming(server):
    async with websockets.connect(server.ws_url) as sender, \
            websockets.connect(server.ws_url + "?audio=binary") as bystander:
        await _ready(sender)
        await _ready(bystander)
        watch = asyncio.create_task(collect(bystander, WINDOW_S))
        task = {"input": "(" * 40_000}
        await sender.send(json.dumps({"type": "task.create", "event_id": "parens", "task": task}))
        error = await _error_for(sender, "parens")
        assert error["code"] == "text_too_long" and error["param"] == "task.input"
        # under the cap, the same shape still reaches the expression finder, which is linear now
        limit = server.app.state.server.settings.max_task_input_chars
        text = "(" * (limit - 20) + " what is 2+2"
        await sender.send(json.dumps({"type": "task.create", "event_id": "near", "task": {"input": text}}))
        ends = ("task.done", "task.error", "error")
        _, events = await collect(sender, 10, until=lambda e: e["type"] in ends)
        assert events[-1]["type"] == "task.done" and events[-1]["result"]["text"] == "2+2 = 4", events[-1]
        frames, _ = await watch
        _assert_contiguous(frames)


def test_find_expression_is_linear_on_hostile_input():
    # each of these took the old backtracking regex minutes; a linear scan takes milliseconds
    assert find_expression("(" * 100_000) is None
    assert find_expression("(" * 100_000 + " x 6*7") == "6*7"
    assert find_expression("1" + " " * 100_000 + "x") is None
    assert find_expression("1+" * 50_000 + "1") == "1+" * 50_000 + "1"


RECONNECTS = 5


@pytest.mark.parametrize("who_closes", ["server", "client"])
async def test_a_closed_sessions_slot_is_free_for_the_next_connection_at_once(engine, who_closes):
    """One slot: whoever ends a session, a client reconnecting the moment it sees the close is admitted."""
    settings = ServerSettings(max_sessions=1, max_session_s=0.5 if who_closes == "server" else 0.0)
    with ServerThread(settings, engine) as server:
        for _ in range(RECONNECTS):
            ws = await websockets.connect(server.ws_url + "?audio=binary")
            _, events = await collect(ws, 5, until=lambda e: e["type"] in ("session.created", "error"))
            assert events[-1]["type"] == "session.created", events
            if who_closes == "client":
                await ws.close()
            else:
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 1000, ws.close_code  # session_expired
        last = await websockets.connect(server.ws_url)
        _, events = await collect(last, 5, until=lambda e: e["type"] in ("session.created", "error"))
        assert events[-1]["type"] == "session.created", events
        await last.close()
        rows, live = await _settled_rows(server, engine, 0)
        assert rows == live == 0
