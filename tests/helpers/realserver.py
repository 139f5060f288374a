"""A real server for end-to-end tests: uvicorn on a free loopback port, in a thread, and a warm engine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from microturn.model.engine import Engine
from microturn.model.engine_core import EngineSpec
from microturn.model.engine_process import ProcessEngine
from microturn.server import protocol as p
from microturn.server.app import create_app
from microturn.server.cli import bound_send_buffer, uvicorn_config
from microturn.server.settings import ServerSettings

PACKET_MS = 20  # client packet size when streaming in real time


def warm_engine(max_slots: int) -> Engine:
    """The tiny preset on CPU with seeded weights, warmed up (share one per test module)."""
    engine = Engine.from_preset("tiny", max_slots=max_slots, device="cpu", seed=0)
    engine.warmup()
    return engine


DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-demo"


def demo_engine(max_slots: int) -> Engine:
    """The shipped demo checkpoint on CPU, warmed up (share one per test module)."""
    engine = Engine.from_checkpoint(DEMO_CHECKPOINT, max_slots=max_slots, device="cpu")
    engine.warmup()
    return engine


def process_engine(max_slots: int, checkpoint: Path | None = None) -> ProcessEngine:
    """The engine core in its own process, as `microturn serve` runs it (the caller closes it)."""
    spec = EngineSpec(
        checkpoint=str(checkpoint) if checkpoint else None, preset="tiny", seed=0, device="cpu", dtype="auto",
        max_slots=max_slots, threads=0,
    )
    engine = ProcessEngine(spec)
    engine.start()
    return engine


def demo_settings(max_sessions: int) -> ServerSettings:
    """As `make serve` runs the demo model: only a task's final result enters text-in, as in training."""
    return ServerSettings(
        max_sessions=max_sessions, checkpoint=str(DEMO_CHECKPOINT), background_text_in="result"
    )


class ServerThread:
    """uvicorn serving `create_app(settings, engine)` on a free loopback port, in a thread."""

    def __init__(
        self, settings: ServerSettings, engine: Engine, background=None, log_level: str = "warning"
    ) -> None:
        self.sock = bound_send_buffer(socket.socket(), settings)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = create_app(settings, engine, background=background)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.http_url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


async def collect(ws, seconds: float, until=None) -> tuple[list[p.Frame], list[dict]]:
    """Binary output frames and JSON events received for `seconds` (or until `until(event)` is true)."""
    frames, events = [], []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if isinstance(message, bytes):
            kind, flags, seq, pts = p.FRAME_HEADER.unpack_from(message)
            frames.append(p.Frame(kind, flags, seq, pts, message[p.FRAME_HEADER.size :]))
        else:
            events.append(json.loads(message))
            if until is not None and until(events[-1]):
                break
    return frames, events


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def stream_binary(
    ws, audio: np.ndarray, rate: int, seconds: float | None = None, packet_ms: int = PACKET_MS
) -> None:
    """Send `audio` (looped up to `seconds`) as 0x01 frames in real time on an absolute clock."""
    step = rate * packet_ms // 1000
    total = int((seconds or len(audio) / rate) * rate)
    flags = p.FLAG_RATE_24K if rate == 24_000 else 0
    start = time.monotonic()
    for i, offset in enumerate(range(0, total, step)):
        idx = np.arange(offset, offset + step) % len(audio)
        await ws.send(p.encode_frame(p.KIND_INPUT_PCM16, i, i * packet_ms, pcm16(audio[idx]), flags=flags))
        await asyncio.sleep(max(0.0, start + (i + 1) * packet_ms / 1000 - time.monotonic()))
