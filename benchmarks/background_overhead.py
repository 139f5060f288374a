"""`microturn bench background`: does background work slow the tick? (it must not)

Starts a real server in-process (uvicorn on a loopback port, the real engine),
connects `--sessions` real WebSocket clients that stream speech in real time,
and measures the engine's tick time (the tick thread's own step durations)
in two phases of `--seconds` each: without background tasks, then with
`--tasks` tasks streaming at once. The tasks run on a synthetic backend that
streams `DELTAS_PER_S` partial results per task with no compute of its own: it
stands for a remote background model (the `openai` backend's scale-out path),
so what is measured is the server's side of the work: pool, events to the
client, scheduling into text-in. Prints a table, then a JSON last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import uvicorn
import websockets

from ..model.engine import Engine
from ..model.slots import SAMPLE_RATE
from ..server import protocol as p
from ..server.app import create_app
from ..server.background import TaskDelta, TaskResult
from ..server.background_service import BackgroundService
from ..server.cli import uvicorn_config
from ..server.settings import ServerSettings

DELTAS_PER_S = 20.0  # partial results per second per synthetic task
PACKET_MS = 20  # client audio packet
WARMUP_S = 2.0  # streaming before a phase's ticks are counted
ALLOWED_SLOWDOWN = 0.10  # the bound: tick p99 with tasks within 10% of without


class StreamingBackend:
    """Synthetic remote model: a partial result every 1/DELTAS_PER_S s until cancelled or `seconds` pass."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self, ctx) -> AsyncIterator[TaskDelta | TaskResult]:
        start, n = time.monotonic(), 0
        while time.monotonic() - start < self.seconds:
            await asyncio.sleep(1 / DELTAS_PER_S)
            n += 1
            yield TaskDelta(f"part {n} ")
        yield TaskResult(f"done after {n} parts")


async def _stream(url: str, speech: np.ndarray, stop: asyncio.Event, task_count: int, events: list) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        async def reader() -> None:
            async for message in ws:
                if isinstance(message, str):
                    kind = json.loads(message)["type"]
                    if kind.startswith("task."):
                        events.append(kind)

        read = asyncio.create_task(reader())
        for i in range(task_count):
            await ws.send(json.dumps({"type": "task.create", "event_id": f"b{i}",
                                      "task": {"input": "stream", "scheduling": "silent"}}))
        step = SAMPLE_RATE * PACKET_MS // 1000
        start, i = time.monotonic(), 0
        while not stop.is_set():
            idx = np.arange(i * step, (i + 1) * step) % len(speech)
            pcm = (np.clip(speech[idx], -1, 1) * 32767).astype("<i2").tobytes()
            await ws.send(p.encode_frame(p.KIND_INPUT_PCM16, i, i * PACKET_MS, pcm))
            i += 1
            await asyncio.sleep(max(0.0, start + i * PACKET_MS / 1000 - time.monotonic()))
        read.cancel()


async def _clients(url: str, sessions: int, tasks: int, seconds: float, speech: np.ndarray) -> list[str]:
    stop, events = asyncio.Event(), []
    per = [tasks // sessions + (i < tasks % sessions) for i in range(sessions)]
    clients = [asyncio.create_task(_stream(url, np.roll(speech, i * 4000), stop, per[i], events))
               for i in range(sessions)]
    await asyncio.sleep(seconds)
    stop.set()
    for result in await asyncio.gather(*clients, return_exceptions=True):
        if isinstance(result, Exception):
            raise result
    return events


def _client_process(url: str, sessions: int, tasks: int, seconds: float, speech: np.ndarray, out) -> None:
    """The clients run in their own process, as they would elsewhere: no GIL shared with the server."""
    out.put(asyncio.run(_clients(url, sessions, tasks, seconds, speech)))


def _phase(app, url: str, sessions: int, tasks: int, seconds: float, speech: np.ndarray) -> tuple[list, list]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(url, sessions, tasks, seconds + WARMUP_S, speech, out))
    tick_ms = app.state.server.tick.step_ms
    proc.start()
    time.sleep(WARMUP_S)
    first = len(tick_ms)
    time.sleep(seconds)
    measured = list(tick_ms)[first:]
    events = out.get(timeout=60)
    proc.join(30)
    while app.state.server.connections:  # slots are freed on the tick thread
        time.sleep(0.05)
    return measured, events


def main(args: argparse.Namespace) -> int:
    from .engine_capacity import load_speech

    settings = ServerSettings(max_sessions=args.sessions, background_max_concurrent=max(16, args.tasks),
                              background_max_per_session=args.tasks, background_timeout_s=600)
    engine = Engine.from_preset(args.preset, max_slots=args.sessions, device=args.device or "auto")
    engine.warmup()
    backend = StreamingBackend(args.seconds + WARMUP_S + 5)
    work = BackgroundService(settings, engine.tokenizer, backend=backend)
    speech = load_speech(None)
    app = create_app(settings, engine, background=work)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/realtime"
    try:
        base, _ = _phase(app, url, args.sessions, 0, args.seconds, speech)
        loaded, events = _phase(app, url, args.sessions, args.tasks, args.seconds, speech)
    finally:
        server.should_exit = True
        thread.join(30)
    b50, b99 = np.percentile(base, [50, 99])
    l50, l99 = np.percentile(loaded, [50, 99])
    deltas = events.count("task.delta")
    print(f"{args.sessions} sessions streaming speech, {args.preset} on {engine.device}; "
          f"{args.tasks} tasks x {DELTAS_PER_S:.0f} deltas/s (synthetic remote backend)")
    print(f"{'phase':>14} {'ticks':>6} {'tick p50 ms':>12} {'tick p99 ms':>12}")
    print(f"{'no tasks':>14} {len(base):6d} {b50:12.1f} {b99:12.1f}")
    print(f"{'with tasks':>14} {len(loaded):6d} {l50:12.1f} {l99:12.1f}   task.delta events: {deltas}")
    ratio = l99 / b99 if b99 else float("nan")
    print(json.dumps({
        "sessions": args.sessions, "tasks": args.tasks, "seconds": args.seconds,
        "device": str(engine.device), "tick_ms_p50_base": round(float(b50), 2),
        "tick_ms_p99_base": round(float(b99), 2), "tick_ms_p50_tasks": round(float(l50), 2),
        "tick_ms_p99_tasks": round(float(l99), 2), "p99_ratio": round(float(ratio), 3),
        "task_deltas": deltas, "within_10pct": bool(ratio <= 1 + ALLOWED_SLOWDOWN),
    }))
    return 0
