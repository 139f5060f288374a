"""Async SDK for a microturn realtime server (one WebSocket per session, `websockets` underneath).

`await connect(url, api_key=...)` opens a session and waits for `session.created`
(a refusal raises `ServerBusy` or `ConnectError`); the `Client` then sends audio
(binary 0x01 frames at 16 or 24 kHz), camera JPEGs (0x02), typed text, session
updates and background tasks, and yields typed events: the server's pydantic models
(`microturn.server.protocol`) for JSON events and `AudioChunk` for binary 0x81
output frames. `connect_with_retry` retries refusals and network errors with
backoff. Pacing is the caller's job: `send_audio` sends at once. This module knows
nothing about files, playback or the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import websockets
from pydantic import ConfigDict

from ...server import protocol as p
from ...server import server_events as ev

OUTPUT_RATE_BINARY = p.PCM_RATE_16K  # binary 0x81 frames carry the engine's 16 kHz audio
OPEN_TIMEOUT_S = 10.0  # handshake plus waiting for session.created
CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the server's close frame
BUSY_CLOSE_CODE = 1013  # "try again later": every slot is taken
RETRY_BACKOFF_S = 0.5  # first wait of connect_with_retry; doubles per attempt
RETRY_MAX_BACKOFF_S = 8.0  # longest wait between attempts


class ConnectError(Exception):
    """The server refused the session (handshake status or an `error` before session.created)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerBusy(ConnectError):
    """All session slots are taken (error `server_busy`, close 1013) or the server is draining."""


class GenericEvent(ev.ServerEvent):
    """A server event this SDK has no model for (kept whole, fields as attributes)."""

    model_config = ConfigDict(extra="allow")


# every typed server event, by its wire type (the class's default `type`)
EVENT_MODELS: dict[str, type[ev.ServerEvent]] = {
    cls.model_fields["type"].default: cls
    for cls in vars(ev).values()
    if isinstance(cls, type) and issubclass(cls, ev.ServerEvent)
    and isinstance(cls.model_fields["type"].default, str)
}
TASK_EVENT_PREFIX = "task."


@dataclass(frozen=True)
class AudioChunk:
    """One micro-turn of model audio from a binary 0x81 frame."""

    seq: int  # micro-turn number in the session (0-based)
    pts_ms: int  # session time of the first sample
    pcm: bytes  # PCM16 LE mono
    rate: int = OUTPUT_RATE_BINARY

    @property
    def samples(self) -> np.ndarray:
        return np.frombuffer(self.pcm, "<i2")


Event = ev.ServerEvent | AudioChunk


def parse_event(message: str | bytes) -> Event:
    """A received WebSocket message as a typed event."""
    if isinstance(message, bytes):
        kind, _, seq, pts = p.FRAME_HEADER.unpack_from(message)
        if kind != p.KIND_OUTPUT_PCM16:
            return GenericEvent(type=f"frame.0x{kind:02x}")
        return AudioChunk(seq, pts, message[p.FRAME_HEADER.size :])
    data = json.loads(message)
    kind = data.get("type", "")
    if kind.startswith(TASK_EVENT_PREFIX) and "task_id" in data:
        return ev.TaskServerEvent.model_validate(data)
    return EVENT_MODELS.get(kind, GenericEvent).model_validate(data)


def pcm16(audio: np.ndarray) -> bytes:
    """float [-1, 1] or int16 samples as PCM16 LE bytes."""
    if audio.dtype == np.int16:
        return audio.astype("<i2").tobytes()
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


class Client:
    """One live session. Iterate it (`async for event in client`) to receive events until it closes."""

    def __init__(self, ws: Any, session: dict) -> None:
        self.ws = ws
        self.session = session  # the session.created payload
        self._seq = itertools.count()
        self._event_ids = itertools.count(1)
        self._pts_samples = 0  # input audio sent so far, at 16 kHz, for frame pts

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def _event_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._event_ids)}"

    async def send_event(self, event: dict[str, Any]) -> str:
        """Send a JSON client event (an event_id is added when missing); returns its event_id."""
        event = {"event_id": self._event_id("evt"), **event}
        await self.ws.send(json.dumps(event))
        return event["event_id"]

    async def send_audio(self, audio: np.ndarray, rate: int = p.PCM_RATE_16K) -> None:
        """Send mono samples (float32 or int16) at 16 or 24 kHz as one binary frame."""
        if rate not in p.PCM_RATES:
            raise ValueError(f"rate must be one of {p.PCM_RATES}, not {rate}")
        flags = p.FLAG_RATE_24K if rate == p.PCM_RATE_24K else 0
        pts_ms = self._pts_samples * 1000 // p.PCM_RATE_16K
        self._pts_samples += len(audio) * p.PCM_RATE_16K // rate
        await self.ws.send(p.encode_frame(p.KIND_INPUT_PCM16, next(self._seq), pts_ms, pcm16(audio), flags))

    async def send_image(self, jpeg: bytes) -> None:
        """Send the latest camera frame (JPEG bytes)."""
        pts_ms = self._pts_samples * 1000 // p.PCM_RATE_16K
        await self.ws.send(p.encode_frame(p.KIND_INPUT_JPEG, next(self._seq), pts_ms, jpeg))

    async def send_text(self, text: str) -> str:
        """Typed user text for the model's text-in slots."""
        content = [{"type": "input_text", "text": text}]
        item = {"type": "message", "role": "user", "content": content}
        return await self.send_event({"type": "conversation.item.create", "item": item})

    async def update_session(self, **session: Any) -> str:
        return await self.send_event({"type": "session.update", "session": session})

    async def create_task(
        self,
        text: str,
        scheduling: str = "when_idle",
        tool: str | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Start a background task; the answer is a `task.created` (or `task.error`) event."""
        task: dict[str, Any] = {"input": text, "scheduling": scheduling}
        if tool is not None:
            task["tool"] = tool
        if timeout_s is not None:
            task["timeout_s"] = timeout_s
        return await self.send_event({"type": "task.create", "task": task})

    async def cancel_task(self, task_id: str) -> str:
        return await self.send_event({"type": "task.cancel", "task_id": task_id})

    async def function_call_output(self, call_id: str, output: str) -> str:
        """Answer a `response.function_call_arguments.done` (a tool this client declared and runs)."""
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        return await self.send_event({"type": "conversation.item.create", "item": item})

    async def clear_output(self) -> str:
        """Barge in: the server drops queued output and answers `output_audio_buffer.cleared`."""
        return await self.send_event({"type": "output_audio_buffer.clear"})

    async def recv(self, timeout: float | None = None) -> Event:
        """The next event; raises `websockets.ConnectionClosed` when the session is over."""
        return parse_event(await asyncio.wait_for(self.ws.recv(), timeout))

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                yield parse_event(await self.ws.recv())
        except websockets.ConnectionClosed:
            return

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    url: str,
    *,
    api_key: str | None = None,
    client_secret: str | None = None,
    binary_audio: bool = True,
    open_timeout: float = OPEN_TIMEOUT_S,
    **ws_options: Any,
) -> Client:
    """Open a session; returns once `session.created` arrived. `binary_audio`: output as 0x81 frames."""
    credential = api_key or client_secret
    headers = {"Authorization": f"Bearer {credential}"} if credential else None
    # microturn's own task.* events on: this SDK knows them (OpenAI clients get them only when they ask)
    target = _with_query(url, task_events="1", **({"audio": "binary"} if binary_audio else {}))
    try:
        ws = await websockets.connect(
            target,
            additional_headers=headers,
            open_timeout=open_timeout,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=None,
            **ws_options,
        )
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        error_type = ServerBusy if status == 503 else ConnectError
        raise error_type(f"http_{status}", body or "handshake refused") from None
    try:
        first = parse_event(await asyncio.wait_for(ws.recv(), open_timeout))
    except (TimeoutError, websockets.ConnectionClosed) as exc:
        await ws.close()
        raise ConnectError("no_session", f"no session.created: {exc!r}") from None
    if isinstance(first, ev.SessionCreated):
        return Client(ws, first.session)
    await ws.close()
    if isinstance(first, ev.ErrorEvent):
        code = first.error.get("code", "error")
        error_type = ServerBusy if code in ("server_busy", "server_draining") else ConnectError
        raise error_type(code, first.error.get("message", ""))
    raise ConnectError("unexpected_event", f"first event was {first.type!r}")


async def connect_with_retry(
    url: str,
    attempts: int = 5,
    backoff_s: float = RETRY_BACKOFF_S,
    **options: Any,
) -> Client:
    """`connect`, retrying a busy server and network errors with exponential backoff (auth errors raise)."""
    for attempt in range(attempts):
        try:
            return await connect(url, **options)
        except (ServerBusy, OSError, TimeoutError):
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(min(backoff_s * 2**attempt, RETRY_MAX_BACKOFF_S))
    raise ValueError("attempts must be at least 1")
