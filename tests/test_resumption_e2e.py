"""Session resumption against real servers (uvicorn on loopback, the tiny engine in-process).

A network blip parks the session (slot and KV kept, output dropped) and the handle continues it
exactly; past the grace period the slot is given back and the handle rebuilds the session from
its record; a reconnect that beats the server to noticing the old socket died takes the session
over; forged, replayed, expired and other credentials' handles are refused before any model work;
and a drain cancels running background tasks (`migrated`) while finished results travel with the
handle to another replica.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import websockets
from helpers.realserver import ServerThread, collect, warm_engine

from microturn.model.engine import Engine
from microturn.server.app import drain
from microturn.server.background.backends.base import TaskResult
from microturn.server.background_service import BackgroundService
from microturn.server.settings import ServerSettings

KEY = "test-shared-key"
pytestmark = pytest.mark.timeout(120)


class QuickOrSlow:
    """Answers at once, except a task whose input says "slow": that one runs until cancelled."""

    name = "test"

    async def run(self, ctx) -> AsyncIterator[TaskResult]:
        if "slow" in ctx.task.input:
            await asyncio.sleep(3600)
        yield TaskResult("the answer is 42")


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    return warm_engine(4), warm_engine(4)


def _server(engine: Engine, name: str, **settings: object) -> ServerThread:
    fields = {"max_sessions": 4, "replica_name": name, "resume_keys": [KEY], "resume_grace_s": 10}
    base = ServerSettings(**{**fields, **settings})
    background = BackgroundService(base, engine.tokenizer, backend=QuickOrSlow())
    return ServerThread(base, engine, background=background)


@pytest.fixture
def server(engines) -> Iterator[ServerThread]:
    with _server(engines[0], "replica-a") as srv:
        yield srv


async def _open(url: str, **headers: str) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(url, max_queue=None, additional_headers=headers)
    return ws, json.loads(await ws.recv())


async def _refusal(url: str, **headers: str) -> tuple[str, int | None]:
    ws, event = await _open(url, **headers)
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    return event["error"]["code"], ws.close_code


async def _until(predicate, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def _state(server: ServerThread):
    return server.app.state.server


async def test_blip_parks_the_session_and_its_handle_continues_it_exactly(server):
    ws, created = await _open(server.ws_url + "?resumable=1&audio=binary")
    assert created["session"]["replica"] == "replica-a" and created["resumption"]["replica"] == "replica-a"
    frames, _ = await collect(ws, 1.0)
    ws.transport.abort()  # no close frame: a dropped network
    await _until(lambda: len(_state(server).resume.parked) == 1)
    assert server.app.state.server.tick.engine.rows == 1  # the slot and its KV are kept
    await asyncio.sleep(0.6)  # the row steps on meanwhile; its output is dropped, not queued
    assert not _state(server).resume.parked._parked[created["session"]["id"]].session.outbox
    ws2, again = await _open(server.ws_url + "?audio=binary&resume_handle=" + created["resumption"]["handle"])
    assert again["type"] == "session.created" and again["session"]["id"] == created["session"]["id"]
    assert again["resumption"]["handle"] != created["resumption"]["handle"]  # rotated
    later, _ = await collect(ws2, 1.0)
    assert later and later[0].seq > frames[-1].seq + 2  # the same row went on: seq did not restart
    assert server.app.state.server.tick.engine.rows == 1 and not _state(server).resume.parked
    await ws2.close()


async def test_past_the_grace_period_the_handle_rebuilds_the_session(engines):
    with _server(engines[0], "replica-a", resume_grace_s=0.3) as server:
        ws, created = await _open(server.ws_url + "?resumable=1")
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "id": "before", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "remember me"}]}}))
        # the seeded model may speak on: a changed record still gets a handle within SPEAKING_HANDLE_S
        _, events = await collect(ws, 8, until=lambda e: e["type"] == "session.resumption_update")
        handle = next(e for e in events if e["type"] == "session.resumption_update")["handle"]
        ws.transport.abort()
        await _until(lambda: _state(server).tick.engine.rows == 0 and not _state(server).resume.parked)
        ws2, again = await _open(server.ws_url + "?audio=binary&resume_handle=" + handle)
        assert again["session"]["id"] == created["session"]["id"]
        await ws2.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "before"}))
        _, events = await collect(ws2, 5, until=lambda e: e["type"] == "conversation.item.retrieved")
        assert events[-1]["item"]["content"][0]["text"] == "remember me"
        session = next(iter(_state(server).connections)).session
        # the model's memory: the newest record text, prefilled into the pinned prefix within its size
        engine = _state(server).tick.engine
        assert session.restored_context and session.instructions == session.restored_context
        assert len(engine.tokenizer.encode(session.instructions)) <= engine.config.prefix_len - 1
        await ws2.close()


async def test_a_reconnect_takes_over_a_socket_the_server_thinks_alive(server):
    old, created = await _open(server.ws_url + "?resumable=1")
    new, again = await _open(server.ws_url + "?resume_handle=" + created["resumption"]["handle"])
    assert again["session"]["id"] == created["session"]["id"]
    _, events = await collect(old, 5, until=lambda e: e["type"] == "error")
    assert events[-1]["error"]["code"] == "session_resumed_elsewhere"
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(old.recv(), 5)
    assert server.app.state.server.tick.engine.rows == 1
    await new.close()


async def test_bad_handles_are_refused_before_any_model_work(engines):
    with _server(engines[0], "replica-a", api_keys=["key-1", "key-2"], resume_ttl_s=1.0) as server:
        alice = {"Authorization": "Bearer key-1"}
        ws, created = await _open(server.ws_url + "?resumable=1", **alice)
        handle = created["resumption"]["handle"]
        await ws.close()
        await _until(lambda: server.app.state.server.tick.engine.rows == 0)
        url = server.ws_url + "?resume_handle="
        assert await _refusal(url + handle[:-8] + "AAAAAAAA", **alice) == ("resume_handle_invalid", 1008)
        assert await _refusal(url + "x" * 7000, **alice) == ("resume_handle_invalid", 1008)
        assert await _refusal(url + handle, Authorization="Bearer key-2") == ("resume_handle_forbidden", 1008)
        assert server.app.state.server.tick.engine.rows == 0  # none of them joined a slot
        ws, again = await _open(url + handle, **alice)
        assert again["type"] == "session.created"
        await ws.close()
        assert await _refusal(url + handle, **alice) == ("resume_handle_replayed", 1008)
        await asyncio.sleep(1.1)
        assert await _refusal(url + again["resumption"]["handle"], **alice) == ("resume_handle_expired", 1008)
        assert server.app.state.server.tick.engine.rows == 0


async def test_drain_cancels_running_tasks_and_carries_finished_results(engines, server):
    ws, created = await _open(server.ws_url + "?resumable=1&task_events=1")
    await ws.send(json.dumps({"type": "task.create", "task": {"input": "quick question"}}))
    await collect(ws, 5, until=lambda e: e["type"] == "task.done")
    await ws.send(json.dumps({"type": "task.create", "task": {"input": "slow question"}}))
    await collect(ws, 5, until=lambda e: e["type"] == "task.created")
    loop = server.app.state.server.tick._loop  # uvicorn's loop, in the server thread
    draining = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(server.app, 5.0), loop))
    _, events = await collect(ws, 5, until=lambda e: e["type"] == "session.go_away")
    kinds = {e["type"]: e for e in events}
    assert kinds["task.cancelled"]["reason"] == "migrated"
    assert kinds["session.resumption_update"]["reason"] == "go_away"
    with _server(engines[1], "replica-b") as other:
        handle = kinds["session.resumption_update"]["handle"]
        ws2, moved = await _open(other.ws_url + "?resume_handle=" + handle)
        assert moved["session"]["id"] == created["session"]["id"]
        assert moved["session"]["replica"] == "replica-b"
        session = next(iter(_state(other).connections)).session
        results = [i.text for i in session.background.record.items if i.role == "task"]
        assert results == ["the answer is 42"]  # the finished one; the cancelled one left nothing
        assert "result: the answer is 42" in session.instructions  # in the model's pinned prefix too
        await ws2.close()
    await ws.close()
    await draining
