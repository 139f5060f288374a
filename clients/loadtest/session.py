"""One load-test session: real-time audio on an absolute clock, and what its client would hear.

`run_session(url, plan, audio, t0, ...)` waits for its staggered start, connects
through the Python SDK, sends `audio` (looped) in 40 ms frames due at fixed
offsets from its own start (sending never drifts, however late a send was), sends
its plan's typed text and background task, and records every output micro-turn.
From the arrivals it derives what a playback client would get: time to first
audio, inter-arrival jitter, underruns (a chunk arriving after the client's
playback cushion ran out; playback then re-buffers, as the demo page does),
missed and duplicate seq, task latency, and the replica that served it. This module knows nothing about
reports, plots or the server's metrics.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import websockets

from ...server.protocol import PCM_RATE_16K
from ..python.sdk import AudioChunk, Client, ConnectError, connect

RATE = PCM_RATE_16K  # input audio rate sent
PACKET_MS = 40  # input frame size
TURN_S = 0.2  # one output micro-turn
TASK_AT = 1 / 3  # share of the duration after which a planned task is sent
DRAIN_S = 0.5  # after the duration: time to collect what is in flight before closing


@dataclass(frozen=True)
class SessionPlan:
    index: int  # session number within its load level
    start_s: float  # start offset from the level's t0 (staggered)
    duration_s: float  # how long audio streams
    text: str | None = None  # typed text sent right after connecting
    task: str | None = None  # background task sent TASK_AT into the session


@dataclass
class SessionResult:
    index: int
    start_s: float  # planned start offset from the level's t0
    refused: str | None = None  # error code when the session was not admitted
    first_audio_ms: float | None = None  # connect start -> first output chunk
    arrivals: list[float] = field(default_factory=list)  # seconds after the level's t0, per chunk
    lateness_ms: list[float] = field(default_factory=list)  # per chunk: behind the 200 ms grid of chunk 0
    jitter_ms: list[float] = field(default_factory=list)  # |inter-arrival - 200 ms| per chunk pair
    underruns: int = 0  # chunks that arrived after the playback cushion ran out
    missed_seq: int = 0  # seq numbers skipped
    duplicate_seq: int = 0  # seq numbers seen twice or going backwards
    task_latency_ms: list[float] = field(default_factory=list)  # task.create -> task.done
    tasks_failed: int = 0  # task.error / cancelled, or no answer within the session
    tasks_unsupported: bool = False  # the server has no background tasks
    errors: list[str] = field(default_factory=list)  # error codes received
    send_lag_ms: list[float] = field(default_factory=list)  # how late this client sent each frame
    closed_early: bool = False  # the server ended the session before the duration
    replica: str | None = None  # the replica that served it (session.created names it; behind a balancer)

    @property
    def chunks(self) -> int:
        return len(self.arrivals)


class Playback:
    """A client's jitter buffer: playback starts `cushion` after a chunk and runs on the 200 ms grid."""

    def __init__(self, cushion_s: float) -> None:
        self.cushion_s = cushion_s
        self._start: float | None = None
        self._played = 0
        self.underruns = 0

    def arrive(self, t: float) -> None:
        if self._start is None:
            self._start, self._played = t + self.cushion_s, 0
        elif t > self._start + self._played * TURN_S:
            self.underruns += 1
            self._start, self._played = t + self.cushion_s, 0
        self._played += 1


async def _send_audio(client: Client, audio: np.ndarray, duration_s: float, lag_ms: list[float]) -> None:
    step = RATE * PACKET_MS // 1000
    start = time.monotonic()
    for i in range(int(duration_s * 1000 // PACKET_MS)):
        due = start + i * PACKET_MS / 1000
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        lag_ms.append((time.monotonic() - due) * 1000)
        offset = (i * step) % len(audio)
        await client.send_audio(np.take(audio, np.arange(offset, offset + step), mode="wrap"), RATE)


async def run_session(
    url: str,
    plan: SessionPlan,
    audio: np.ndarray,
    t0: float,
    cushion_s: float,
    api_key: str | None = None,
) -> SessionResult:
    result = SessionResult(plan.index, plan.start_s)
    await asyncio.sleep(max(0.0, t0 + plan.start_s - time.monotonic()))
    started = time.monotonic()
    try:
        client = await connect(url, api_key=api_key, max_queue=None)
    except (ConnectError, OSError, TimeoutError) as exc:
        result.refused = getattr(exc, "code", type(exc).__name__)
        return result
    result.replica = client.session_info.get("replica")
    playback = Playback(cushion_s)
    task_sent: dict[str, float] = {}  # event_id -> send time
    task_ids: dict[str, str] = {}  # task_id -> event_id
    sender = asyncio.create_task(_send_audio(client, audio, plan.duration_s, result.send_lag_ms))
    tasker = asyncio.create_task(_send_extras(client, plan, task_sent))
    deadline = started + plan.duration_s + DRAIN_S
    last_seq: int | None = None
    first_arrival = 0.0
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = await client.recv(timeout=left)
            except TimeoutError:
                break
            now = time.monotonic()
            if isinstance(event, AudioChunk):
                if last_seq is not None and event.seq <= last_seq:
                    result.duplicate_seq += 1
                    continue
                if last_seq is None:
                    result.first_audio_ms = (now - started) * 1000
                    first_arrival = now
                else:
                    result.missed_seq += event.seq - last_seq - 1
                    result.jitter_ms.append(abs(now - t0 - result.arrivals[-1] - TURN_S) * 1000)
                last_seq = event.seq
                result.arrivals.append(now - t0)
                result.lateness_ms.append((now - first_arrival - len(result.lateness_ms) * TURN_S) * 1000)
                playback.arrive(now)
            else:
                _on_event(event, now, result, task_sent, task_ids)
    except websockets.ConnectionClosed:
        result.closed_early = time.monotonic() < started + plan.duration_s
    finally:
        sender.cancel()
        tasker.cancel()
        await client.close()
    result.underruns = playback.underruns
    result.tasks_failed += len(task_sent)  # asked, never answered
    return result


async def _send_extras(client: Client, plan: SessionPlan, task_sent: dict[str, float]) -> None:
    if plan.text:
        await client.send_text(plan.text)
    if plan.task:
        await asyncio.sleep(plan.duration_s * TASK_AT)
        event_id = await client.task.create(plan.task)
        task_sent[event_id] = time.monotonic()


def _on_event(
    event: object, now: float, result: SessionResult, task_sent: dict[str, float], task_ids: dict[str, str]
) -> None:
    kind = getattr(event, "type", "")
    data = event.model_dump() if hasattr(event, "model_dump") else {}
    if kind == "error":
        code = data["error"].get("code", "error")
        if code == "unsupported" and data["error"].get("event_id") in task_sent:
            result.tasks_unsupported = True
            task_sent.pop(data["error"]["event_id"])
        else:
            result.errors.append(code)
    elif kind == "task.created":
        event_id = data.get("client_event_id") or next(iter(task_sent), None)
        if event_id is not None:
            task_ids[data["task_id"]] = event_id
    elif kind in ("task.done", "task.error", "task.cancelled"):
        event_id = task_ids.pop(data["task_id"], None) or data.get("client_event_id")
        sent = task_sent.pop(event_id, None) if event_id else None
        if kind == "task.done" and sent is not None:
            result.task_latency_ms.append((now - sent) * 1000)
        elif sent is not None:
            result.tasks_failed += 1
