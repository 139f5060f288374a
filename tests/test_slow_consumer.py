"""A client that stops reading loses its session as a slow consumer, and no other session notices.

Real uvicorn on loopback and real WebSocket clients, default output limits. The victim stops
reading its socket (its transport is paused). The server's bounded SO_SNDBUF
(`send_buffer_bytes`) keeps the kernel from absorbing megabytes of its output, so the server's
send blocks within seconds, the output queue passes `max_output_queue_turns` and the server
closes it with 1008 (`slow_consumer`) and frees the slot - well before the keepalive (ping
period plus pong timeout, 40 s) could. Meanwhile a bystander on the same engine must get
every micro-turn.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest
import websockets
from helpers.realserver import ServerThread, collect, warm_engine

from microturn.model.engine import Engine
from microturn.model.slots import TURN_SAMPLES
from microturn.server import protocol as p
from microturn.server.settings import ServerSettings

MAX_SLOTS = 2
GIVE_UP_S = 30.0  # the victim must be gone within this, before the default keepalive (40 s) could
TINY_RCVBUF = 4096  # the stuck victim's receive buffer: the server's sends back up at once
RELEASE_S = 15.0  # generous bound for the server to let go of a stuck victim's socket after closing it
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
    settings = ServerSettings(max_sessions=MAX_SLOTS)
    assert settings.ping_interval_s + settings.ping_timeout_s > GIVE_UP_S
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
            # the close frame itself may not fit through buffers the victim never drained (then 1006)
            assert victim.close_code in (1008, 1006), victim.close_code
            slow = await asyncio.to_thread(srv.metric, 'microturn_errors_total{code="slow_consumer"}')
            assert slow == 1, "the victim was not closed as a slow consumer"

    assert not [e for e in events if e["type"] == "error"], events
    assert [f.seq for f in frames] == list(range(len(frames))), "the bystander lost micro-turns"
    assert all(f.kind == p.KIND_OUTPUT_PCM16 and len(f.payload) == 2 * TURN_SAMPLES for f in frames)


def server_side_open(server_port: int, client_port: int) -> bool:
    """The kernel still holds the server's end of this connection (with its fd, or orphaned with a buffer)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, remote = line.split()[1:3]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return True
    return False


def slow_consumers(srv: ServerThread) -> float:
    try:
        return srv.metric('microturn_errors_total{code="slow_consumer"}')
    except KeyError:  # no such error yet
        return 0.0


async def test_a_stuck_client_closed_as_slow_consumer_has_its_socket_cut(engine):
    """The close frame cannot get past a client that never reads: the server cuts the transport rather
    than holding the socket, its buffers and its fd for as long as the client likes."""
    settings = ServerSettings(max_sessions=MAX_SLOTS, max_output_queue_turns=3)
    with ServerThread(settings, engine) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)  # before connect: the window
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        client_port = sock.getsockname()[1]
        async with websockets.connect(srv.ws_url, sock=sock, max_queue=None) as victim:
            first = json.loads(await victim.recv())
            assert first["type"] == "session.created", first
            victim.transport.pause_reading()  # never reads again, until the server has let go
            deadline = time.monotonic() + GIVE_UP_S
            while not await asyncio.to_thread(slow_consumers, srv):
                assert time.monotonic() < deadline, "the client that never reads was not closed"
                await asyncio.sleep(0.2)
            deadline = time.monotonic() + RELEASE_S
            while server_side_open(srv.port, client_port):
                assert time.monotonic() < deadline, "the server still holds the closed client's socket"
                await asyncio.sleep(0.2)
            assert await asyncio.to_thread(srv.metric, "microturn_active_sessions") == 0

            victim.transport.resume_reading()  # the client finds its connection reset or closed
            try:
                await asyncio.wait_for(victim.wait_closed(), RELEASE_S)
            finally:
                assert victim.state is websockets.State.CLOSED
