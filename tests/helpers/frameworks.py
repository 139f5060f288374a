"""Shared pieces of the framework end-to-end tests: a demo-model server, speech, pacing, waiting.

The frameworks (openai-agents, pipecat, livekit-agents) are real OpenAI Realtime clients; these
helpers only start the microturn server they talk to, make espeak speech for them to send in real
time, script the model's text-out where a test needs a deterministic tool call, and wait for what
the app observed with a clear message on timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from microturn.model.engine import Engine
from microturn.training.espeak import speak

from .realserver import ServerThread, demo_settings, pcm16

RATE = 24_000  # what all three frameworks send and expect: OpenAI's audio/pcm at 24 kHz
CHUNK_MS = 100  # the app's microphone packets
API_KEY = "unused-on-loopback"  # every framework insists on one; microturn has auth off here
TYPED_QUESTION = "repeat the word tiger"  # the demo model answers "tiger." (15/15 typed in its eval)
ANSWER_WORD = "tiger"
TOOL_NAME = "get_weather"
TOOL_CITY = "Paris"
TOOL_RESULT = "sunny and 21 degrees"
# the task the model writes (scripted): the background side picks the declared tool closest in meaning
# and reads its arguments from the text (server/background/backends/tool_choice.py)
TOOL_REQUEST = f"what is the weather in {TOOL_CITY}"
TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "the city"}},
    "required": ["city"],
}


class FrameworkServer(ServerThread):
    """A real microturn server on the shipped demo model (as `make serve` runs it), on loopback."""

    def __init__(self, engine: Engine, max_sessions: int = 2, log_level: str = "warning") -> None:
        self.engine = engine
        super().__init__(demo_settings(max_sessions), engine, log_level=log_level)

    @property
    def http_base(self) -> str:
        """The base URL an OpenAI HTTP client is given (livekit derives ws://.../v1/realtime from it)."""
        return f"{self.http_url}/v1"

    def sessions(self) -> list[Any]:
        return [c.session for c in list(self.app.state.server.connections)]

    async def session(self, timeout: float = 10.0) -> Any:
        """The server side of the (only) connected client, once it exists."""
        return (await until(lambda: (s := self.sessions()) and s[-1], timeout, "the client's server session"))

    async def script_tool_call(self, text: str = TOOL_REQUEST, timeout: float = 10.0) -> None:
        """Make the model write a task marker `TASK_START text TASK_END` in its text-out, through the real
        model path (constrained decoding), as tests/test_tasks_e2e.py does: the background side then
        calls the client-declared tool named in it."""
        sp = self.engine.tokenizer.special
        session = await self.session(timeout)
        session.script_text_out([sp.TASK_START, *text.encode(), sp.TASK_END])


def speech_pcm(text: str, voice: str = "en-us+m3", rate: int = RATE) -> bytes:
    """espeak-ng speech (a training voice of the demo model) as PCM16 LE mono at `rate`, peak -6 dBFS,
    with 300 ms of silence before and 1.2 s after (so the model hears the end of the turn)."""
    audio = speak(text, voice=voice, speed=155, pitch=45, rate=rate)
    audio = 0.5 * audio / max(float(np.abs(audio).max()), 1e-6)
    return pcm16(np.concatenate([np.zeros(rate * 3 // 10), audio, np.zeros(rate * 12 // 10)]))


def chunks(pcm: bytes, rate: int = RATE, chunk_ms: int = CHUNK_MS) -> list[bytes]:
    step = rate * chunk_ms // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def stream_realtime(
    send: Callable[[bytes], Awaitable[None] | None], pcm: bytes, rate: int = RATE, chunk_ms: int = CHUNK_MS
) -> None:
    """Hand `pcm` to `send` in `chunk_ms` packets on an absolute real-time clock (a live microphone:
    microturn refuses audio that runs far ahead of real time)."""
    start = time.monotonic()
    for i, chunk in enumerate(chunks(pcm, rate, chunk_ms)):
        result = send(chunk)
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            await result
        await asyncio.sleep(max(0.0, start + (i + 1) * chunk_ms / 1000 - time.monotonic()))


async def until(predicate: Callable[[], Any], timeout: float, what: str,
                diagnose: Callable[[], str] | None = None, poll: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` (and
    `diagnose()`, e.g. the server events seen) when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        await asyncio.sleep(poll)


def event_types(events: list[dict]) -> str:
    """A compact run-length summary of server event types, for failure messages."""
    out: list[str] = []
    last, count = None, 0
    for e in events:
        t = e.get("type")
        if t == last:
            count += 1
            continue
        if last is not None:
            out.append(f"{last} x{count}" if count > 1 else last)
        last, count = t, 1
    if last is not None:
        out.append(f"{last} x{count}" if count > 1 else last)
    return "server events: " + ", ".join(out)


def errors_of(events: list[dict]) -> list[dict]:
    return [e.get("error") for e in events if e.get("type") == "error"]


WAIT_S = 30.0  # generous: 2 shared cores run the server, the engine and the framework
BARGE_IN_TEXT = "hello there"


def truncated(app: Any, item_id: str) -> list[dict]:
    """The server's conversation.item.truncated events for `item_id`."""
    return [e for e in app.server_of("conversation.item.truncated") if e["item_id"] == item_id]


def not_doubled(text: str) -> bool:
    """False for "tigetiger."-style doubling (the same deltas counted twice) or a repeated answer."""
    t = text.strip()
    half = len(t) // 2
    return bool(t) and not (len(t) % 2 == 0 and t[:half] == t[half:]) and t.count(ANSWER_WORD) <= 1

MARKS = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
