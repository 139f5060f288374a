"""`microturn talk`: stream a WAV file to a server in real time and record the reply.

The input (any rate, mono or stereo, anything soundfile reads) is mixed to mono,
resampled to 16 kHz and sent as 40 ms frames on an absolute clock. The model's audio
(one 200 ms micro-turn per tick) is written to `--out` as 16 kHz PCM16; its text and
background-task events are printed as they arrive. The session ends once the reply
covers the input plus `--tail` seconds and every task it started has ended, or a wall
limit passes. Last line: a JSON summary. This module knows nothing about the server's
internals.
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

import numpy as np
import soundfile as sf

from ...model.resample import resample
from ...server.protocol import PCM_RATE_16K
from .sdk import AudioChunk, Client, ConnectError, connect_with_retry

RATE = PCM_RATE_16K  # rate sent and recorded
PACKET_MS = 40  # input frame size
TURN_S = 0.2  # one micro-turn of output
DEFAULT_TAIL_S = 2.0  # reply recorded after the input ends
TASK_WAIT_S = 30.0  # longest extra wait for started background tasks to end
API_KEY_ENV = "MICROTURN_API_KEY"
TASK_END = ("task.done", "task.error", "task.cancelled")


def read_mono(path: str, rate: int = RATE) -> np.ndarray:
    """A sound file as mono float32 at `rate`."""
    audio, file_rate = sf.read(path, dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), file_rate, rate)


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
    audio = read_mono(args.wav) if args.wav else np.zeros(0, np.float32)
    input_s = len(audio) / RATE
    target_turns = math.ceil((input_s + args.tail) / TURN_S)
    client = await connect_with_retry(args.url, api_key=args.api_key or os.environ.get(API_KEY_ENV))
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
    except ConnectError as exc:
        print(f"microturn talk: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
