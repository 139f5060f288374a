"""`microturn talk`: stream a WAV file to a server in real time and record the reply.

The input (any rate, mono or stereo, anything soundfile reads) is mixed to mono,
resampled to 16 kHz and sent as 40 ms frames on an absolute clock. The model's audio
(one 200 ms micro-turn per tick) is written to `--out` as 16 kHz PCM16; its text and
background-task events are printed as they arrive. The session ends once the reply
covers the input plus `--tail` seconds and every task it started has ended, or a wall
limit passes. Last line: a JSON summary. This module knows nothing about the server's
internals.

Failing politely: the URL and the input file are checked before connecting, and every reason the
session cannot open or goes on (refused, bad handshake, lost connection) is one line on stderr.
Exit codes (the README's "Command line" table): 2 = a bad value (a URL that is not ws:// or
wss://), 1 = the world disagrees (missing or unreadable WAV, nothing listening, server refused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf
import websockets

from ...model.resample import resample
from ...server.protocol import PCM_RATE_16K
from .sdk import AudioChunk, Client, ConnectError, ServerBusy, connect, connect_with_retry

RATE = PCM_RATE_16K  # rate sent and recorded
PACKET_MS = 40  # input frame size
TURN_S = 0.2  # one micro-turn of output
DEFAULT_TAIL_S = 2.0  # reply recorded after the input ends
TASK_WAIT_S = 30.0  # longest extra wait for started background tasks to end
API_KEY_ENV = "MICROTURN_API_KEY"
TASK_END = ("task.done", "task.error", "task.cancelled")
EXIT_FAILURE = 1  # same codes as cli.py: the arguments are fine, the world is not
EXIT_USAGE = 2  # a value no run could accept (argparse uses 2 too)
WS_SCHEMES = ("ws", "wss")
EXAMPLE_URL = "ws://127.0.0.1:8000/v1/realtime"
RAW_PCM_HINT = "raw 16 kHz PCM16 needs a header: sox -t raw -r 16000 -e signed -b 16 -c 1 in.pcm in.wav"
AUTH_CODES = ("http_401", "http_403")  # the handshake statuses of a missing or wrong key


class TalkError(Exception):
    """A reason `microturn talk` cannot run, with its exit code; reported as one line."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_mono(path: str, rate: int = RATE) -> np.ndarray:
    """A sound file as mono float32 at `rate`."""
    audio, file_rate = sf.read(path, dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), file_rate, rate)


def check_url(url: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in WS_SCHEMES or not urlsplit(url).netloc:
        raise TalkError(f"--url {url!r} is not a WebSocket URL; use ws:// or wss://, e.g. {EXAMPLE_URL}",
                        EXIT_USAGE)


def load_input(path: str | None) -> np.ndarray:
    """The --wav speech as mono 16 kHz, or no audio; `TalkError` when the file is missing or unreadable."""
    if not path:
        return np.zeros(0, np.float32)
    if not os.path.isfile(path):
        raise TalkError(f"--wav {path}: file not found")
    try:
        return read_mono(path)
    except (sf.LibsndfileError, RuntimeError) as exc:  # raw PCM has no header to read the rate from
        reason = getattr(exc, "error_string", "") or str(exc)
        raise TalkError(f"--wav {path}: not a sound file soundfile can read ({reason}); {RAW_PCM_HINT}") \
            from None


# ConnectError codes the SDK gives a session that never reached a server; their cause says why
UNREACHED_CODES = ("unreachable", "invalid_url")


def root_cause(exc: BaseException) -> BaseException:
    """The network error under an SDK `ConnectError` that wraps one (raised `from None`, so it is the
    context, not the cause), else `exc` itself."""
    if isinstance(exc, ConnectError) and exc.code in UNREACHED_CODES and exc.__context__ is not None:
        return exc.__context__
    return exc


def retryable(exc: BaseException) -> bool:
    """Worth another try: a busy server or a flaky network, but not a port nothing listens on
    (retrying cannot help a one-shot command: say so now, not after seconds of backoff)."""
    root = root_cause(exc)
    if isinstance(root, ConnectionRefusedError):
        return False
    if isinstance(exc, ConnectError):
        return isinstance(exc, ServerBusy) or exc.code == "unreachable"
    return isinstance(root, (OSError, TimeoutError))


async def open_session(url: str, api_key: str | None) -> Client:
    """`connect` once; on a retryable failure, `connect_with_retry` with its backoff."""
    try:
        return await connect(url, api_key=api_key)
    except (ConnectError, OSError, TimeoutError) as exc:
        if not retryable(exc):
            raise
    return await connect_with_retry(url, api_key=api_key)


def describe_connect_failure(url: str, exc: BaseException) -> str:
    """One line for why the session did not open."""
    root = root_cause(exc)
    if isinstance(root, ConnectionRefusedError):
        return f"cannot connect to {url}: connection refused (is `microturn serve` running there?)"
    if isinstance(root, websockets.InvalidURI) or getattr(exc, "code", "") == "invalid_url":
        return f"--url {url!r} is not a valid WebSocket URL, e.g. {EXAMPLE_URL}"
    if isinstance(root, websockets.InvalidHandshake):
        return f"cannot open a WebSocket at {url} (is it a microturn server?): {root}"
    if isinstance(root, TimeoutError):
        return f"cannot connect to {url}: timed out"
    if isinstance(root, OSError):
        return f"cannot connect to {url}: {root.strerror or root}"
    hint = f"; set --api-key or ${API_KEY_ENV}" if getattr(exc, "code", "") in AUTH_CODES else ""
    return f"the server at {url} refused the session: {exc}{hint}"


async def stream_audio(
    client: Client, audio: np.ndarray, rate: int = RATE, packet_ms: int = PACKET_MS
) -> None:
    """Send `audio` in `packet_ms` frames, each due at start + i * packet_ms (no drift)."""
    step = rate * packet_ms // 1000
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(audio), step)):
        await asyncio.sleep(max(0.0, start + i * packet_ms / 1000 - time.monotonic()))
        await client.send_audio(audio[offset : offset + step], rate)


class Recorder:
    """Writes output chunks to a WAV and prints text and task events; counts what it saw."""

    def __init__(self, out: sf.SoundFile | None, started: float) -> None:
        self.out = out
        self.started = started
        self.turns = 0
        self.text: list[str] = []
        self.open_tasks: set[str] = set()
        self.tasks_ended = 0
        self.errors: list[dict] = []

    def _say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.2f}s] {line}", flush=True)

    def on_event(self, event: Any) -> None:
        if isinstance(event, AudioChunk):
            self.turns += 1
            if self.out is not None:
                self.out.write(event.samples)
            return
        kind = event.type
        if kind in ("response.output_text.delta", "response.output_audio_transcript.delta"):
            self.text.append(event.delta)
            self._say(f"text {event.delta!r}")
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._say(f"heard {event.transcript!r}")
        elif kind == "error":
            self.errors.append(event.error)
            self._say(f"error {event.error.get('code')}: {event.error.get('message')}")
        elif kind.startswith("task."):
            self._on_task(kind, event.model_dump())

    def _on_task(self, kind: str, data: dict) -> None:
        task_id = data["task_id"]
        if kind == "task.created":
            self.open_tasks.add(task_id)
            self._say(f"{kind} {task_id}: {data.get('task', {}).get('input', '')}")
        elif kind == "task.delta":
            self._say(f"{kind} {task_id}: {data['delta'].get('text', '')}")
        elif kind == "task.done":
            self._say(f"{kind} {task_id}: {data['result'].get('text', '')}")
        elif kind == "task.error":
            self._say(f"{kind} {task_id}: {data['error'].get('code')}: {data['error'].get('message')}")
        else:
            self._say(f"{kind} {task_id}: {data.get('reason', '')}")
        if kind in TASK_END:
            self.open_tasks.discard(task_id)
            self.tasks_ended += 1


async def talk(args: argparse.Namespace) -> dict:
    check_url(args.url)
    audio = load_input(args.wav)
    input_s = len(audio) / RATE
    target_turns = math.ceil((input_s + args.tail) / TURN_S)
    try:
        client = await open_session(args.url, args.api_key or os.environ.get(API_KEY_ENV))
    except (ConnectError, OSError, TimeoutError, websockets.InvalidURI, websockets.InvalidHandshake) as exc:
        raise TalkError(describe_connect_failure(args.url, exc)) from None
    out = sf.SoundFile(args.out, "w", samplerate=RATE, channels=1, subtype="PCM_16") if args.out else None
    recorder = Recorder(out, time.monotonic())
    tasks_asked = 0
    try:
        if args.text:
            await client.send_text(args.text)
        if args.task:
            await client.task.create(args.task)
            tasks_asked = 1
        sender = asyncio.create_task(stream_audio(client, audio))
        deadline = time.monotonic() + input_s + args.tail + TASK_WAIT_S
        async for event in client:
            recorder.on_event(event)
            tasks_pending = recorder.open_tasks or recorder.tasks_ended < tasks_asked
            if recorder.turns >= target_turns and not tasks_pending:
                break
            if time.monotonic() > deadline:
                print("talk: wall limit reached before the reply was complete", file=sys.stderr)
                break
        sender.cancel()
    finally:
        await client.close()
        if out is not None:
            out.close()
    return {
        "turns": recorder.turns,
        "out_s": round(recorder.turns * TURN_S, 3),
        "rate": RATE,
        "input_s": round(input_s, 3),
        "text": "".join(recorder.text),
        "tasks_ended": recorder.tasks_ended,
        "errors": len(recorder.errors),
    }


def talk_main(args: argparse.Namespace) -> int:
    try:
        summary = asyncio.run(talk(args))
    except TalkError as exc:
        print(f"microturn talk: {exc}", file=sys.stderr)
        return exc.exit_code
    except websockets.ConnectionClosedError as exc:  # the session opened, then the server went away
        print(f"microturn talk: the connection to {args.url} was lost ({exc})", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(summary))
    return 0
