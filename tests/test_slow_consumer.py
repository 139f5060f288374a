"""A client that stops reading loses its session, and no other session notices.

Real uvicorn on loopback and real WebSocket clients. The victim stops reading its socket (its
transport is paused). Loopback kernel buffers absorb megabytes (tens of seconds of JSON audio)
before the server's send blocks and its output queue could pass `max_output_queue_turns`
(the `slow_consumer` close, 1008), so what ends such a client first is the keepalive: it
answers no ping (a client only answers pings while it reads), and the server closes it after
`ping_interval_s + ping_timeout_s` (1011) and frees the slot. Meanwhile a bystander on the
same engine must get every micro-turn. Short pings keep the test short.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import websockets
from realserver import ServerThread, collect, warm_engine

from microturn.model.engine import Engine
from microturn.model.slots import TURN_SAMPLES
from microturn.server import protocol as p
from microturn.server.settings import ServerSettings

MAX_SLOTS = 2
QUEUE_TURNS = 5  # a small output queue: whichever guard fires first must free the slot
PING_S = 1.0  # ping period and pong timeout
GIVE_UP_S = 30.0  # the victim must be gone well within this
PACKET_MS = 100


@pytest.fixture(scope="module")
def engine() -> Engine:
    return warm_engine(MAX_SLOTS)


async def feed(ws, stop: asyncio.Event) -> None:
    """Quiet noise as 16 kHz 0x01 frames in real time until `stop` (or the socket closes)."""
    rng = np.random.default_rng(0)
    samples = 16_000 * PACKET_MS // 1000
    start, i = time.monotonic(), 0
    try:
        while not stop.is_set():
            pcm = (rng.standard_normal(samples) * 30).astype("<i2").tobytes()
            await ws.send(p.encode_frame(p.KIND_INPUT_PCM16, i, i * PACKET_MS, pcm))
            i += 1
            await asyncio.sleep(max(0.0, start + i * PACKET_MS / 1000 - time.monotonic()))
    except websockets.ConnectionClosed:
        return


async def watch(ws, frames: list[p.Frame], events: list[dict]) -> None:
    """Everything `ws` receives, until cancelled."""
    while True:
        more_frames, more_events = await collect(ws, 0.5)
        frames += more_frames
        events += more_events


async def test_a_client_that_never_reads_is_closed_and_the_other_session_lives(engine):
    settings = ServerSettings(max_sessions=MAX_SLOTS, max_output_queue_turns=QUEUE_TURNS,
                              ping_interval_s=PING_S, ping_timeout_s=PING_S)
    with ServerThread(settings, engine) as srv:
        async with (
            websockets.connect(srv.ws_url, max_queue=None) as victim,
            websockets.connect(srv.ws_url + "?audio=binary", max_queue=None) as bystander,
        ):
            victim.transport.pause_reading()  # never reads again (until the end, to see how it ended)
            stop = asyncio.Event()
            feeds = [asyncio.create_task(feed(ws, stop)) for ws in (victim, bystander)]
            frames: list[p.Frame] = []
            events: list[dict] = []
            watcher = asyncio.create_task(watch(bystander, frames, events))
            deadline = time.monotonic() + GIVE_UP_S
            while await asyncio.to_thread(srv.metric, "microturn_active_sessions") > 1:
                assert time.monotonic() < deadline, "the client that never reads still holds its slot"
                await asyncio.sleep(0.5)
            seen_at_close = len(frames)
            deadline = time.monotonic() + GIVE_UP_S
            while len(frames) < seen_at_close + 5:  # the bystander goes on after the victim is gone
                assert time.monotonic() < deadline, "the bystander stopped getting output"
                await asyncio.sleep(0.2)
            watcher.cancel()
            stop.set()
            await asyncio.gather(*feeds)

            victim.transport.resume_reading()
            try:
                async for _ in victim:
                    pass
            except websockets.ConnectionClosed:
                pass
            assert victim.close_code in (1011, 1008, 1006), victim.close_code

    assert not [e for e in events if e["type"] == "error"], events
    assert [f.seq for f in frames] == list(range(len(frames))), "the bystander lost micro-turns"
    assert all(f.kind == p.KIND_OUTPUT_PCM16 and len(f.payload) == 2 * TURN_SAMPLES for f in frames)
