"""Background tasks end to end: real uvicorn, real WebSocket clients, the real tiny engine and worker pool."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import websockets
from helpers.realserver import ServerThread, collect, warm_engine

from microturn.model.engine import Engine
from microturn.model.tokenizer import TextOutDecoder
from microturn.server.background import Tool
from microturn.server.background_service import BackgroundService
from microturn.server.settings import ServerSettings

MAX_SLOTS = 4


@pytest.fixture(scope="module")
def engine() -> Engine:
    return warm_engine(MAX_SLOTS)


class _Server(ServerThread):
    """A ServerThread whose background work has one extra tool: `slow`, which sleeps (to cancel it)."""

    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.work = BackgroundService(settings, engine.tokenizer)

        async def slow(text: str) -> str:
            await asyncio.sleep(60)
            return text

        self.work.registry.register(Tool(
            "slow", "sleeps for a minute", {"type": "object", "properties": {"text": {"type": "string"}},
                                            "required": ["text"]}, slow,
        ))
        super().__init__(settings, engine, background=self.work)

    def sessions(self) -> list:
        return [c.session for c in self.app.state.server.connections]


@pytest.fixture
def server(engine) -> Iterator[_Server]:
    settings = ServerSettings(max_sessions=MAX_SLOTS, background_max_per_session=2, debug_events=True,
                              task_events=True)
    with _Server(settings, engine) as srv:
        yield srv


async def _events(ws, seconds: float, until=None) -> list[dict]:
    return (await collect(ws, seconds, until))[1]


def _background_text(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "debug.text_in" and e["source"] == "background")


async def test_task_events_go_only_to_clients_that_take_them(engine: Engine) -> None:
    """OpenAI clients validate every event: a model-started task runs (its result joins the record) without
    microturn's task.* events, unless the client asks for them (?task_events=1 or session.update)."""
    settings = ServerSettings(max_sessions=MAX_SLOTS, debug_events=True)
    with ServerThread(settings, engine) as srv:
        async with websockets.connect(srv.ws_url) as plain, \
                websockets.connect(srv.ws_url + "?task_events=1") as asking:
            await collect(plain, 0.5)
            sp = engine.tokenizer.special
            sessions = [c.session for c in srv.app.state.server.connections]
            for session in sessions:
                session.script_text_out([sp.TASK_START, *b"what is 17 * 23?", sp.TASK_END])
            seen = await _events(asking, 20, until=lambda e: e["type"] == "task.done")
            assert "391" in seen[-1]["result"]["text"]
            quiet = await _events(plain, 2.0)
            plain_session = next(x for x in sessions if not x.task_events)
            results = [i.text for i in plain_session.background.record.items if i.role == "task"]
            assert results and "391" in results[0]  # the task ran for the plain client too
            assert not [e for e in quiet if e["type"].startswith("task.")]
            await plain.send(json.dumps({"type": "session.update", "session": {"task_events": True}}))
            for session in sessions:
                session.script_text_out([sp.TASK_START, *b"what is 2 * 3?", sp.TASK_END])
            after = await _events(plain, 20, until=lambda e: e["type"] == "task.done")
            assert after[-1]["type"] == "task.done"


async def test_task_create_streams_and_reaches_text_in(server: _Server) -> None:
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "task.create", "event_id": "e1",
                                  "task": {"input": "what is 17 * 23?", "scheduling": "interrupt"}}))
        events = await _events(ws, 15, until=lambda e: e["type"] == "task.done")
        created = [e for e in events if e["type"] == "task.created"]
        assert created and created[0]["client_event_id"] == "e1"
        task_id = created[0]["task_id"]
        deltas = [e for e in events if e["type"] == "task.delta" and e["task_id"] == task_id]
        assert len(deltas) >= 2 and [d["seq"] for d in deltas] == list(range(len(deltas)))
        done = [e for e in events if e["type"] == "task.done"]
        assert done and "391" in done[0]["result"]["text"]
        # the streamed result goes into the model's text-in slots of later micro-turns (4 tokens a turn)
        events += await _events(ws, 20, until=lambda e: "391" in _background_text(events + [e]))
        assert "391" in _background_text(events)
    assert server.metric("microturn_background_text_tokens_total") > 0


async def test_task_cancel_and_per_session_limit(server: _Server) -> None:
    async with websockets.connect(server.ws_url) as ws:
        for i in range(3):
            await ws.send(json.dumps({"type": "task.create", "event_id": f"s{i}",
                                      "task": {"input": "zzz", "tool": "slow"}}))
        events = await _events(ws, 3)
        created = [e for e in events if e["type"] == "task.created"]
        refused = [e for e in events if e["type"] == "task.error"]
        assert len(created) == 2 and len(refused) == 1
        assert refused[0]["error"]["code"] == "task_limit" and refused[0]["client_event_id"] == "s2"
        await ws.send(json.dumps({"type": "task.cancel", "event_id": "c1", "task_id": created[0]["task_id"]}))
        await ws.send(json.dumps({"type": "task.cancel", "event_id": "c2", "task_id": "task_nope"}))
        events = await _events(ws, 2)
        cancelled = [e for e in events if e["type"] == "task.cancelled"]
        assert cancelled and cancelled[0]["task_id"] == created[0]["task_id"]
        errors = [e for e in events if e["type"] == "error"]
        assert errors and errors[0]["error"]["code"] == "unknown_task"
        assert errors[0]["error"]["event_id"] == "c2"


async def test_barge_in_makes_when_idle_result_stale(server: _Server) -> None:
    settings = server.app.state.server.settings
    settings.speaking_threshold_dbfs = -400.0  # the model always counts as speaking: when_idle waits
    try:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "task.create", "event_id": "w1",
                                      "task": {"input": "what is 6 * 7?", "scheduling": "when_idle"}}))
            events = await _events(ws, 15, until=lambda e: e["type"] == "task.done")
            assert any(e["type"] == "task.done" for e in events)
            events += await _events(ws, 1)
            assert _background_text(events) == ""  # still waiting: the model is speaking
            tasks = server.sessions()[0].background
            assert tasks.scheduler.pending() > 0
            await ws.send(json.dumps({"type": "response.cancel", "event_id": "b1"}))  # barge-in
            events = await _events(ws, 1)
            assert any(e["type"] == "output_audio_buffer.cleared" for e in events)
            settings.speaking_threshold_dbfs = 400.0  # now idle: a live when_idle item would be spoken
            events = await _events(ws, 1.5)
            assert "42" not in _background_text(events)
            assert tasks.scheduler.pending() == 0
    finally:
        settings.speaking_threshold_dbfs = -45.0


async def test_model_task_marker_starts_a_task(server: _Server, engine: Engine) -> None:
    sp = engine.tokenizer.special
    async with websockets.connect(server.ws_url) as ws:
        await _events(ws, 0.5)
        # constrained decoding forces the marker into text-out through the real model path
        server.sessions()[0].script_text_out([sp.TASK_START, *b"12*12", sp.TASK_END])
        events = await _events(ws, 15, until=lambda e: e["type"] == "task.done")
        created = [e for e in events if e["type"] == "task.created"]
        assert created and created[0]["task"]["origin"] == "model" and created[0]["task"]["input"] == "12*12"
        assert "144" in next(e for e in events if e["type"] == "task.done")["result"]["text"]


async def test_model_calls_a_client_declared_tool_over_the_websocket(server: _Server, engine: Engine) -> None:
    """A background tool only the client has: the model's marker names it, the server asks the client
    (response.function_call_arguments.done), the client's function_call_output finishes the task."""
    sp = engine.tokenizer.special
    order = {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}
    tool = {"type": "function", "name": "lookup_order", "description": "an order's status",
            "parameters": order, "behavior": "background"}
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {"tools": [tool]}}))
        await _events(ws, 0.5)
        server.sessions()[0].script_text_out([sp.TASK_START, *b"lookup_order: A17", sp.TASK_END])
        events = await _events(ws, 15, until=lambda e: e["type"] == "response.function_call_arguments.done")
        call = events[-1]
        assert call["type"] == "response.function_call_arguments.done", [e["type"] for e in events]
        assert call["name"] == "lookup_order" and json.loads(call["arguments"]) == {"order": "A17"}
        created = next(e for e in events if e["type"] == "task.created")
        assert created["task"]["tool"] == "lookup_order" and created["task"]["origin"] == "tool_call"

        bad = [{"type": "function_call_output", "call_id": "call_nope", "output": "x"},
               {"type": "function_call_output", "output": "no call id"}]
        for i, item in enumerate(bad):
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": f"bad{i}",
                                      "item": item}))
        answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "shipped on Monday"}
        await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "ok", "item": answer}))
        events = await _events(ws, 15, until=lambda e: e["type"] == "task.done")
        errors = {e["error"]["event_id"]: e["error"]["code"] for e in events if e["type"] == "error"}
        assert errors == {"bad0": "unknown_call", "bad1": "invalid_event"}
        added = [e for e in events if e["type"] == "conversation.item.added"]
        assert added and added[0]["item"]["call_id"] == call["call_id"]
        done = events[-1]
        assert done["task_id"] == call["task_id"] and done["result"]["output"] == "shipped on Monday"


def test_marker_decoding_spans_turns_and_drops_runaways(engine: Engine) -> None:
    sp = engine.tokenizer.special
    decoder = TextOutDecoder(engine.tokenizer)
    assert decoder.feed([sp.PAD, sp.TASK_START, *b"what ti"]).task_texts == []
    turn = decoder.feed([*b"me is it", sp.TASK_END, *b"x"])
    assert turn.task_texts == ["what time is it"] and turn.text == "x"
    assert decoder.feed([sp.TASK_START, *(b"a" * 600), sp.TASK_END]).task_texts == []
    assert decoder.feed([sp.TASK_END]).task_texts == []
