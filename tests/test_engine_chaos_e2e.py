"""Chaos: the engine process is killed (SIGKILL) or frozen (SIGSTOP) under live, streaming sessions.

A real server on loopback over the engine core in its own process, real WebSocket clients streaming
espeak speech. What must hold: the server process lives (/healthz answers throughout), every live
session gets an `engine_restarting` error and a 1012 close (never 1011), /readyz turns false and a
connection made meanwhile is refused the same way, the engine comes back in a fresh process, and new
sessions then stream audio again with the engine's rows equal to the live sessions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import websockets
from helpers.realserver import ServerThread, collect, process_engine, stream_binary

from microturn.model.engine_process import ProcessEngine
from microturn.server.settings import ServerSettings

RECOVER_S = 90.0  # a fresh engine process imports torch, builds the model and warms up (2-core CI)
RATE = "input_rate_exceeded"
HEALTH_BUDGET_S = 1.0  # /healthz must answer this fast while the engine is down


@pytest.fixture(scope="module")
def engine() -> Iterator[ProcessEngine]:
    """Its own engine process: these tests kill it."""
    engine = process_engine(4)
    yield engine
    engine.close()


@pytest.fixture
def server(engine) -> Iterator[ServerThread]:
    with ServerThread(ServerSettings(max_sessions=3), engine) as srv:
        yield srv


async def _streaming(server: ServerThread, speech: np.ndarray):
    ws = await websockets.connect(server.ws_url + "?audio=binary")
    await collect(ws, 5, until=lambda e: e["type"] == "session.created")
    feed = asyncio.create_task(stream_binary(ws, speech, 16_000, seconds=30))
    frames, _ = await collect(ws, 1.0)
    assert frames, "no audio before the chaos"
    return ws, feed


async def _closed_by_restart(ws) -> dict:
    """The error event the session got before its close; asserts the close says 'service restart'.

    A frozen engine stalls the tick for the deadline, so a streaming client may first be told its audio
    runs too far ahead of real time (input_rate_exceeded, not fatal)."""
    _, events = await collect(ws, 15, until=lambda e: e["type"] == "error" and e["error"]["code"] != RATE)
    errors = [e["error"] for e in events if e["type"] == "error" and e["error"]["code"] != RATE]
    assert errors and errors[-1]["code"] == "engine_restarting", errors
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1012, (ws.close_code, ws.close_reason)
    return errors[-1]


async def _watch_recovery(server: ServerThread) -> tuple[bool, float]:
    """(saw /readyz false, slowest /healthz) until /readyz is true again."""
    saw_down, slowest = False, 0.0
    deadline = time.monotonic() + RECOVER_S
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert (await http.get("/healthz")).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            ready = await http.get("/readyz")
            if ready.status_code == 503:
                saw_down = True
                assert ready.json()["engine"] == "restarting"
            elif saw_down:
                return saw_down, slowest
            await asyncio.sleep(0.05)
    raise AssertionError("the engine did not come back")


async def _new_session_streams(server: ServerThread, engine: ProcessEngine, speech: np.ndarray) -> None:
    async with websockets.connect(server.ws_url + "?audio=binary") as ws:
        await collect(ws, 5, until=lambda e: e["type"] == "session.created")
        feed = asyncio.create_task(stream_binary(ws, speech, 16_000, seconds=2))
        frames, events = await collect(ws, 2.0)
        await feed
        assert len(frames) >= 5, (len(frames), events)
        seqs = [f.seq for f in frames]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert engine.rows == len(server.app.state.server.connections) == 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
async def test_engine_loss_closes_sessions_cleanly_and_the_engine_comes_back(server, engine, speech_16k, sig):
    restarts = server.metric("microturn_engine_restarts_total")
    first, first_feed = await _streaming(server, speech_16k)
    second, second_feed = await _streaming(server, speech_16k)
    old_pid = engine.pid
    assert engine.rows == 2

    os.kill(old_pid, sig)
    watch = asyncio.create_task(_watch_recovery(server))
    for ws in (first, second):
        await _closed_by_restart(ws)
    for feed in (first_feed, second_feed):
        feed.cancel()
    # a connection made while the engine is down is refused the same way, not left hanging
    if not watch.done():
        async with websockets.connect(server.ws_url) as late:
            _, events = await collect(late, 5, until=lambda e: e["type"] == "error")
            if events and events[-1]["type"] == "error":  # the restart may already be over
                assert events[-1]["error"]["code"] == "engine_restarting"

    saw_down, slowest_health = await watch
    assert saw_down
    assert slowest_health < HEALTH_BUDGET_S
    assert engine.pid != old_pid
    with pytest.raises(ProcessLookupError):  # the frozen one was killed, not left behind
        for _ in range(50):
            os.kill(old_pid, 0)
            time.sleep(0.1)
    assert server.metric("microturn_engine_restarts_total") == restarts + 1
    assert server.metric("microturn_engine_up") == 1
    await _new_session_streams(server, engine, speech_16k)


async def test_a_step_that_keeps_failing_counts_as_a_lost_engine(server, engine, speech_16k, monkeypatch):
    """A whole-batch failure is dropped once; one that repeats must not silence every session for good."""
    ws, feed = await _streaming(server, speech_16k)

    def broken_pack(inputs):
        raise RuntimeError("a bug in packing the batch")

    monkeypatch.setattr(engine._table, "pack", broken_pack)  # this table only: a restart builds a new one
    watch = asyncio.create_task(_watch_recovery(server))
    await _closed_by_restart(ws)
    feed.cancel()
    saw_down, _ = await watch
    assert saw_down
    await _new_session_streams(server, engine, speech_16k)
