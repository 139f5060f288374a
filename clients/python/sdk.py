"""Async SDK for a microturn realtime server (one WebSocket per session, `websockets` underneath).

It reads like the `openai` package's realtime connection: `async with connect(url) as conn`
(or `conn = await connect(url)`) opens a session and waits for `session.created`; a
refusal or a network failure raises `ConnectError` (`ServerBusy` when every slot is
taken). Client events are namespaced calls with OpenAI's names and fields:
`conn.session.update(session={...})`, `conn.conversation.item.create(item={...})`,
`.truncate` / `.delete` / `.retrieve`, `conn.input_audio_buffer.append(audio=...)` /
`.commit()` / `.clear()`, `conn.response.create()` / `.cancel()`,
`conn.output_audio_buffer.clear()`. What only microturn has stays: `send_audio` /
`send_image` as binary frames (0x01 PCM at 16 or 24 kHz, 0x02 JPEG), binary 0x81 output
as `AudioChunk`, and background work as `conn.task.create(...)` / `.cancel(task_id)`.
Iterating the connection yields typed events: the server's pydantic models
(`microturn.server.server_events`). `connect_with_retry` retries a busy server and network
errors with backoff. Pacing is the caller's job: `send_audio` sends at once. This module
knows nothing about files, playback or the engine.
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
    """No session: the server refused it (handshake status or an `error` before session.created), or it
    could not be reached (`code` "unreachable": refused connection, bad address, timeout)."""

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


class _Resource:
    """A namespace of client events (`conn.session`, `conn.response`, ...), as the openai package has."""

    def __init__(self, client: Client, prefix: str) -> None:
        self._client, self._prefix = client, prefix

    async def _send(self, name: str, fields: dict[str, Any]) -> str:
        event = {"type": f"{self._prefix}.{name}", **{k: v for k, v in fields.items() if v is not None}}
        return await self._client.send_event(event)


class SessionResource(_Resource):
    async def update(self, *, session: dict[str, Any], event_id: str | None = None) -> str:
        return await self._send("update", {"session": session, "event_id": event_id})


class ResponseResource(_Resource):
    async def create(self, *, response: dict[str, Any] | None = None, event_id: str | None = None) -> str:
        """Ask the model to speak now (`response` may carry `metadata`, `instructions`)."""
        return await self._send("create", {"response": response, "event_id": event_id})

    async def cancel(self, *, response_id: str | None = None, event_id: str | None = None) -> str:
        return await self._send("cancel", {"response_id": response_id, "event_id": event_id})


class ItemResource(_Resource):
    async def create(self, *, item: dict[str, Any], previous_item_id: str | None = None,
                     event_id: str | None = None) -> str:
        return await self._send("create", {"item": item, "previous_item_id": previous_item_id,
                                           "event_id": event_id})

    async def truncate(self, *, item_id: str, audio_end_ms: int, content_index: int = 0,
                       event_id: str | None = None) -> str:
        return await self._send("truncate", {"item_id": item_id, "audio_end_ms": audio_end_ms,
                                             "content_index": content_index, "event_id": event_id})

    async def delete(self, *, item_id: str, event_id: str | None = None) -> str:
        return await self._send("delete", {"item_id": item_id, "event_id": event_id})

    async def retrieve(self, *, item_id: str, event_id: str | None = None) -> str:
        return await self._send("retrieve", {"item_id": item_id, "event_id": event_id})


class ConversationResource:
    def __init__(self, client: Client) -> None:
        self.item = ItemResource(client, "conversation.item")


class InputAudioBufferResource(_Resource):
    async def append(self, *, audio: str, event_id: str | None = None) -> str:
        """Base64 PCM16 at the session's input rate (JSON; `send_audio` sends a binary frame instead)."""
        return await self._send("append", {"audio": audio, "event_id": event_id})

    async def commit(self, *, event_id: str | None = None) -> str:
        return await self._send("commit", {"event_id": event_id})

    async def clear(self, *, event_id: str | None = None) -> str:
        return await self._send("clear", {"event_id": event_id})


class OutputAudioBufferResource(_Resource):
    async def clear(self, *, event_id: str | None = None) -> str:
        """Barge in: the server drops queued output and answers `output_audio_buffer.cleared`."""
        return await self._send("clear", {"event_id": event_id})


class TaskResource(_Resource):
    """microturn's background tasks: answers come as `task.created` / `.delta` / `.done` events."""

    async def create(self, input: str, *, scheduling: str = "when_idle", tool: str | None = None,
                     timeout_s: float | None = None, event_id: str | None = None) -> str:
        task: dict[str, Any] = {"input": input, "scheduling": scheduling}
        if tool is not None:
            task["tool"] = tool
        if timeout_s is not None:
            task["timeout_s"] = timeout_s
        return await self._send("create", {"task": task, "event_id": event_id})

    async def cancel(self, task_id: str, *, event_id: str | None = None) -> str:
        return await self._send("cancel", {"task_id": task_id, "event_id": event_id})


class Client:
    """One live session. Iterate it (`async for event in conn`) to receive events until it closes."""

    def __init__(self, ws: Any, session: dict) -> None:
        self.ws = ws
        self.session_info = session  # the session.created payload
        self.session = SessionResource(self, "session")
        self.response = ResponseResource(self, "response")
        self.conversation = ConversationResource(self)
        self.input_audio_buffer = InputAudioBufferResource(self, "input_audio_buffer")
        self.output_audio_buffer = OutputAudioBufferResource(self, "output_audio_buffer")
        self.task = TaskResource(self, "task")
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
        """Typed user text for the model's text-in slots (a user message item)."""
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        return await self.conversation.item.create(item=item)

    async def function_call_output(self, call_id: str, output: str) -> str:
        """Answer a `response.function_call_arguments.done` (a tool this client declared and runs)."""
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        return await self.conversation.item.create(item=item)

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


class connect:  # noqa: N801 - used as a function, like websockets.connect and the openai SDK's connect
    """Open a session: `conn = await connect(url)` or `async with connect(url) as conn` (closed on exit).
    Returns once `session.created` arrived. `binary_audio`: output as 0x81 frames."""

    def __init__(self, url: str, **options: Any) -> None:
        self._url, self._options = url, options
        self._client: Client | None = None

    def __await__(self):  # noqa: ANN204 - the awaitable protocol
        return _connect(self._url, **self._options).__await__()

    async def __aenter__(self) -> Client:
        self._client = await _connect(self._url, **self._options)
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


async def _connect(
    url: str,
    *,
    api_key: str | None = None,
    client_secret: str | None = None,
    binary_audio: bool = True,
    open_timeout: float = OPEN_TIMEOUT_S,
    **ws_options: Any,
) -> Client:
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
    except websockets.InvalidURI as exc:
        raise ConnectError("invalid_url", f"{url!r} is not a ws:// or wss:// URL ({exc})") from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        raise ConnectError("unreachable", f"cannot reach {url}: {exc or type(exc).__name__}") from None
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
        except ConnectError as exc:
            retryable = isinstance(exc, ServerBusy) or exc.code == "unreachable"
            if not retryable or attempt == attempts - 1:
                raise
        await asyncio.sleep(min(backoff_s * 2**attempt, RETRY_MAX_BACKOFF_S))
    raise ValueError("attempts must be at least 1")
