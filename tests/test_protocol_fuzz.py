"""Hypothesis fuzzes the protocol against a live server while a bystander streams speech beside it.

One real uvicorn on loopback and the tiny engine. A fuzzed client sends generated traffic: mutated
JSON events (wrong field types, NaN / Infinity / 1e999 spelled in JSON, deep nesting, long and
odd Unicode strings, lone surrogate escapes, payloads up to the message limit), random event
orders and binary frames (any kind and flags, truncated headers, odd-length PCM, garbage JPEG).
After each example: the bystander's 0x81 frames are contiguous and still arriving, /healthz
answers, the fuzzed client saw only `error` events of known codes or a documented fatal close
(never 1011), the server logged nothing at ERROR, and the engine has one row per live session.

`make test` runs a short seeded profile; `MICROTURN_FUZZ_SECONDS=600` (`make fuzz`) runs fresh
random batches for that long.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import websockets
from helpers.realserver import ServerThread, process_engine, stream_binary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microturn.server import protocol as p
from microturn.server.engine_api import EngineAPI
from microturn.server.errors import CLOSE_CODES, ErrorCode
from microturn.server.settings import ServerSettings

FUZZ_SECONDS = float(os.environ.get("MICROTURN_FUZZ_SECONDS") or 0)
FUZZING = FUZZ_SECONDS > 0 or os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
# make test: a fixed seed, no example database, so CI sees the same examples every run
TEST_PROFILE = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                        suppress_health_check=_SLOW_OK)
# make fuzz: fresh random batches (a failure is saved to .hypothesis/ and replayed first next run)
FUZZ_PROFILE = settings(max_examples=200, deadline=None, suppress_health_check=_SLOW_OK)

MAX_MESSAGE_BYTES = 256 * 1024  # small, so payloads "up to the message limit" stay cheap to build
HEALTHZ_S = 2.0  # generous: /healthz shares the event loop with every session
STALL_S = 2.0  # longest gap allowed between two bystander micro-turns (they come every 200 ms)
SYNC_S = 15.0  # how long the fuzzed session may take to answer the sync event after an example
CONNECT_S = 10.0
ROWS_SETTLE_S = 5.0
# documented fatal closes; 1011 is a bug by definition, and 1009 is uvicorn's answer to an oversize message
FATAL_CLOSES = frozenset(code for err, code in CLOSE_CODES.items() if err is not ErrorCode.INTERNAL_ERROR)
TOO_BIG_CLOSE = 1009
KNOWN_CODES = frozenset(code.value for code in ErrorCode) - {ErrorCode.INTERNAL_ERROR.value}


# --- JSON spelled by hand: strategies build trees whose leaves may be tokens json.dumps cannot write ---
@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim: NaN, 1e999, a 5000-digit integer, deep nesting."""

    text: str


@dataclass(frozen=True)
class Big:
    """A long string built only when sent, so hypothesis keeps (size, char) and not megabytes."""

    size: int
    char: str


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Big):
        return json.dumps(value.char * value.size)
    if isinstance(value, dict):
        return "{" + ",".join(f"{to_json(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    # floats: NaN / Infinity as Python's JSON spells them; strings: ensure_ascii sends \ud800 as an escape
    return json.dumps(value)


class Wire:
    """One message as sent; its repr folds long runs (`<'A'*5000>`), so a failing example prints short."""

    RUN = re.compile(r"(.{1,16}?)\1{15,}", re.DOTALL)

    def __init__(self, data: str | bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return self.RUN.sub(lambda m: f"<{m.group(1)}*{len(m.group(0)) // len(m.group(1))}>", repr(self.data))


def _jpeg(width: int, height: int) -> bytes:
    ok, data = cv2.imencode(".jpg", np.zeros((height, width, 3), np.uint8))
    assert ok
    return data.tobytes()


TINY_JPEG = _jpeg(8, 8)
# the same JPEG with a 65535 x 65535 SOF0: refused from its header, before any decode
_SOF = TINY_JPEG.index(b"\xff\xc0")
HUGE_JPEG = TINY_JPEG[: _SOF + 5] + b"\xff\xff\xff\xff" + TINY_JPEG[_SOF + 9 :]
TINY_JPEG_URL = "data:image/jpeg;base64," + base64.b64encode(TINY_JPEG).decode()
SILENCE_B64 = base64.b64encode(bytes(960)).decode()  # 20 ms at 24 kHz

EDGE_STRINGS = [
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\ud83dy", "\u200f\u202eevil\u202c", "\ufeff",
    "\U0001f600" * 4, "e\u0301" * 8, "\uffff", "\u2028\u2029", "null", "NaN", "{}", "[]", "%s%n",
    "data:image/jpeg;base64,", TINY_JPEG_URL,
    "data:image/jpeg;base64," + base64.b64encode(HUGE_JPEG).decode(), "data:image/jpeg;base64,!!!",
    "AAA", "AA==", "=", SILENCE_B64, "pcm16", "audio/pcm", "binary", "json", "background", "interrupt",
    "silent", "when_idle", "function", "message", "user", "system", "input_text", "input_image",
    "input_audio", "function_call_output", "server_vad", "high", "task_0",
]
RAW_TOKENS = [
    "NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0", "0.0", "1E400",
    "18446744073709551616", "-9223372036854775809", "9223372036854775807", "1" + "0" * 5000,
    "123456789.123456789e-330", "true", "null",
]

edge_text = st.sampled_from(EDGE_STRINGS) | st.text(max_size=40)
leaves = st.one_of(
    st.none(), st.booleans(), edge_text,
    st.integers() | st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(RAW_TOKENS).map(Raw),
    st.integers(1, 20_000).map(lambda n: Raw("[" * n + "]" * n)),
    st.integers(1, 20_000).map(lambda n: Raw('{"a":' * n + "1" + "}" * n)),
    st.builds(Big, st.integers(0, MAX_MESSAGE_BYTES // 8) | st.integers(0, 5000),
              st.sampled_from(["a", "(", "\u00e9", "\U0001f600", "\\", "\x00", " ", "A"])),
)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(edge_text, children, max_size=4),
    max_leaves=12,
)

TOOL = {"type": "function", "name": "lookup", "behavior": "background", "description": "look it up",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}
TEMPLATES: dict[str, list[dict]] = {
    "session.update": [
        {"session": {"instructions": "be brief", "temperature": 0.8, "seed": 7, "tools": [TOOL],
                     "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                         "turn_detection": {"type": "semantic_vad", "eagerness": "high"},
                                         "transcription": None},
                               "output": {"format": {"type": "audio/pcm", "rate": 16000},
                                          "transport": "json"}}}},
        {"session": {"input_audio_format": "pcm16", "output_audio_format": "pcm16",
                     "turn_detection": {"type": "server_vad"}, "output_modalities": ["audio", "text"]}},
        {"session": {"output_modalities": ["text"], "max_output_tokens": 64, "tool_choice": "none",
                     "audio": {"input": {"turn_detection": None}, "output": {"voice": "microturn"}}}},
        {"session": {"tool_choice": {"type": "function", "name": "lookup"}, "max_output_tokens": "inf",
                     "audio": {"input": {"turn_detection": {"create_response": False,
                                                            "interrupt_response": False}}}}},
    ],
    "input_audio_buffer.append": [{"audio": SILENCE_B64}],
    "input_audio_buffer.commit": [{}],
    "input_audio_buffer.clear": [{}],
    "conversation.item.create": [
        {"item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what is 2+2"},
            {"type": "input_image", "image_url": TINY_JPEG_URL},
            {"type": "input_audio", "audio": SILENCE_B64}]}},
        {"item": {"type": "function_call_output", "call_id": "call_0", "output": "shipped"}},
        {"previous_item_id": "root", "item": {"id": "item_client_1", "type": "message", "role": "assistant",
                                              "content": [{"type": "output_text", "text": "earlier reply"}]}},
    ],
    "conversation.item.truncate": [{"item_id": "item_client_1", "content_index": 0, "audio_end_ms": 1500}],
    "conversation.item.delete": [{"item_id": "item_client_1"}],
    "conversation.item.retrieve": [{"item_id": "item_client_1"}],
    "response.create": [{}, {"response": {"instructions": "say hi", "metadata": {"client_event_id": "r1"},
                                          "output_modalities": ["audio"], "conversation": "auto"}}],
    "response.cancel": [{}, {"response_id": "resp_0"}],
    "output_audio_buffer.clear": [{}],
    "task.create": [{"task": {"input": "what is 6*7", "scheduling": "silent", "tool": None, "timeout_s": 5}}],
    "task.cancel": [{"task_id": "task_0"}],
}
assert set(TEMPLATES) == p.CLIENT_EVENT_TYPES


def _paths(tree: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every container in the tree (where a field can be replaced, deleted or added)."""
    if isinstance(tree, dict | list):
        yield path
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for key, child in items:
            yield from _paths(child, (*path, key))


@st.composite
def json_events(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(sorted(p.CLIENT_EVENT_TYPES)) | edge_text)
    event: dict[Any, Any] = {"type": kind, **json.loads(json.dumps(draw(st.sampled_from(
        TEMPLATES.get(kind, [{}])))))}
    if draw(st.booleans()):
        event["event_id"] = draw(edge_text | values)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(event))))
        node = event
        for key in path:
            node = node[key]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "add" or not keys:
            key = draw(edge_text) if isinstance(node, dict) else len(node)
            if isinstance(node, dict):
                node[key] = draw(values)
            else:
                node.append(draw(values))
        elif op == "delete":
            del node[draw(st.sampled_from(keys))]
        else:
            node[draw(st.sampled_from(keys))] = draw(values)
    return to_json(event)


raw_texts = st.one_of(
    st.sampled_from(["", " ", "{", "[]", "1", '"x"', "null", "{}", '{"type":1}', '{"type":null}',
                     '{"type":"session.update"}', '{"type":"session.update","session":[]}', "\x00",
                     '{"type":"input_audio_buffer.append","audio":"' + "A" * 10_001 + '"}']),
    st.integers(1, 50_000).map(lambda n: "[" * n),
    st.integers(1, 50_000).map(lambda n: '{"type":"session.update","session":' + "[" * n + "]" * n + "}"),
    st.text(max_size=80),
)

frame_kinds = st.sampled_from([p.KIND_INPUT_PCM16, p.KIND_INPUT_JPEG, p.KIND_OUTPUT_PCM16, 0x82, 0, 0xFF]) \
    | st.integers(0, 255)
payloads = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 4000).map(bytes),  # even and odd lengths of silence
    st.sampled_from([TINY_JPEG, HUGE_JPEG, TINY_JPEG[:40], b"\xff\xd8\xff", b"\xff\xd8\xff\xe0" + bytes(99)]),
    st.binary(min_size=1, max_size=32).map(lambda b: b"\xff\xd8" + b * 64),  # JPEG magic, garbage body
    st.integers(0, MAX_MESSAGE_BYTES - p.FRAME_HEADER.size).map(bytes),
)
frames = st.one_of(
    st.builds(p.encode_frame, frame_kinds, st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
              payloads, flags=st.sampled_from([0, p.FLAG_RATE_24K]) | st.integers(0, 255)),
    st.binary(max_size=p.FRAME_HEADER.size - 1),  # truncated header
)
one_message = st.one_of(json_events(), json_events(), raw_texts, frames).map(Wire)
messages = st.lists(one_message, min_size=1, max_size=6)


# --- the rig: server, bystander and fuzzed client on a client event loop in its own thread ---
class ErrorLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Peer:
    """One client socket and everything it has received."""

    ws: Any
    frames: list[tuple[int, float]] = field(default_factory=list)  # (seq, arrival)
    events: list[dict] = field(default_factory=list)
    close_code: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.frames.append((p.FRAME_HEADER.unpack_from(message)[2], time.monotonic()))
                else:
                    self.events.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd  # None: the socket dropped without a close frame
            self.close_code = rcvd.code if rcvd is not None else None
            self.closed.set()


class Rig:
    def __init__(self, server: ServerThread, engine: EngineAPI, logs: ErrorLogs) -> None:
        self.server, self.engine, self.logs = server, engine, logs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.fuzzed: Peer | None = None
        self.examples = self.reconnects = 0
        self.codes: dict[str, int] = {}

    def run(self, coro: Coroutine, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def connect(self, query: str = "") -> Peer:
        deadline = time.monotonic() + CONNECT_S
        while True:
            peer = Peer(await websockets.connect(self.server.ws_url + query, max_size=None))
            first = json.loads(await asyncio.wait_for(peer.ws.recv(), CONNECT_S))
            if first["type"] == "session.created":
                asyncio.ensure_future(peer.read())
                return peer
            # a just-closed session may still hold its engine slot for a tick
            assert first["error"]["code"] == ErrorCode.SERVER_BUSY and time.monotonic() < deadline, first
            await peer.ws.close()
            await asyncio.sleep(0.2)

    async def start_bystander(self, speech: np.ndarray) -> None:
        self.bystander = await self.connect("?audio=binary")
        stream = stream_binary(self.bystander.ws, speech, 16_000, seconds=36_000)
        self.streaming = asyncio.ensure_future(stream)

    async def close(self) -> None:
        self.streaming.cancel()
        for peer in (self.bystander, self.fuzzed):
            if peer is not None:
                await peer.ws.close()
                await peer.closed.wait()

    def check_bystander(self) -> None:
        peer = self.bystander
        assert not peer.closed.is_set(), f"the bystander was closed ({peer.close_code})"
        assert not self.streaming.done(), self.streaming.exception()
        seqs = [seq for seq, _ in peer.frames]
        assert seqs, "the bystander got no audio"
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), [
            (a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1][:5]
        stalled = time.monotonic() - peer.frames[-1][1]
        assert stalled < STALL_S, f"the bystander's micro-turns stopped ({stalled:.1f} s)"

    async def send_example(self, batch: list[Wire], sync_id: str) -> list[tuple[Peer, bool]]:
        """Send the batch (reconnecting after a close), then a sync event whose error ends the example."""
        sessions: list[tuple[Peer, bool]] = []  # every session used, and whether it was sent an oversize one
        sync = json.dumps({"type": "input_audio_buffer.append", "event_id": sync_id})
        for message in [*(wire.data for wire in batch), sync]:
            if self.fuzzed is None or self.fuzzed.closed.is_set():
                self.reconnects += self.fuzzed is not None
                self.fuzzed = await self.connect()
            if not sessions or sessions[-1][0] is not self.fuzzed:
                sessions.append((self.fuzzed, False))
            size = len(message if isinstance(message, bytes) else message.encode("utf-8", "surrogatepass"))
            sessions[-1] = (self.fuzzed, sessions[-1][1] or size > MAX_MESSAGE_BYTES)
            try:
                await self.fuzzed.ws.send(message)
            except websockets.ConnectionClosed:
                await self.fuzzed.closed.wait()
        peer = self.fuzzed
        deadline = time.monotonic() + SYNC_S
        while not any(e.get("error", {}).get("event_id") == sync_id for e in peer.events):
            if peer.closed.is_set():
                break
            assert time.monotonic() < deadline, "the fuzzed session stopped answering"
            await asyncio.sleep(0.02)
        return sessions

    def check_fuzzed(self, sessions: list[tuple[Peer, bool]]) -> None:
        for peer, oversize in sessions:
            for event in peer.events:
                if event["type"] == "error":
                    code = event["error"]["code"]
                    self.codes[code] = self.codes.get(code, 0) + 1
                    assert code in KNOWN_CODES, event
            if peer.closed.is_set():
                # past the limit the server closes 1009 with our message unread: its kernel may reset the
                # connection, and the reset can overtake the close frame (None)
                allowed = FATAL_CLOSES | ({TOO_BIG_CLOSE, None} if oversize else set())
                assert peer.close_code in allowed, f"closed with {peer.close_code}: {peer.events[-3:]}"
            peer.events.clear()

    def check_server(self) -> None:
        started = time.monotonic()
        assert httpx.get(f"{self.server.http_url}/healthz", timeout=HEALTHZ_S).status_code == 200
        assert time.monotonic() - started < HEALTHZ_S
        # cleared, so the shrinker blames only the example that logged
        records, self.logs.records = self.logs.records, []
        assert not records, [f"{r.name}: {r.getMessage()}" for r in records]

    def check_rows(self) -> None:
        deadline = time.monotonic() + ROWS_SETTLE_S
        while True:
            rows, live = self.engine.rows, len(self.server.app.state.server.connections)
            if rows == live or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert rows == live, f"{rows} engine rows for {live} live sessions"

    def example(self, batch: list[Wire]) -> None:
        self.examples += 1
        sessions = self.run(self.send_example(batch, f"sync-{self.examples}"))
        self.check_fuzzed(sessions)
        self.check_bystander()
        self.check_server()
        self.check_rows()


# hypothesis sees the global random state move during generation: websockets' keepalive pings draw from
# it on the client thread, which is no strategy's doing
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")


@pytest.fixture(scope="module")
def rig(speech_16k: np.ndarray) -> Iterator[Rig]:
    logs = ErrorLogs()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    engine = process_engine(4)
    settings_ = ServerSettings(max_sessions=3, max_message_bytes=MAX_MESSAGE_BYTES, max_text_chars=2048,
                               max_task_input_chars=2048, background_max_per_session=2)
    with ServerThread(settings_, engine) as server:
        for logger in loggers:
            logger.addHandler(logs)
        rig = Rig(server, engine, logs)
        rig.thread.start()
        try:
            rig.run(rig.start_bystander(speech_16k))
            time.sleep(1.0)  # the bystander's jitter cushion fills and its first micro-turns arrive
            yield rig
        finally:
            for logger in loggers:
                logger.removeHandler(logs)
            rig.run(rig.close())
            rig.loop.call_soon_threadsafe(rig.loop.stop)
            rig.thread.join(5)
    engine.close()  # after the server: its sessions' leaves reach a live engine


def _example(rig: Rig, batch: list[Wire]) -> None:
    rig.example(batch)


_fuzz = (FUZZ_PROFILE if FUZZING else TEST_PROFILE)(given(batch=messages)(_example))


def test_fuzzed_protocol_never_breaks_the_server_or_a_bystander(rig: Rig) -> None:
    stop = time.monotonic() + (FUZZ_SECONDS or 600)
    _fuzz(rig)
    while FUZZING and time.monotonic() < stop:  # one batch of examples per hypothesis run
        _fuzz(rig)
    if rig.fuzzed is not None:
        rig.run(rig.fuzzed.ws.close())
        rig.fuzzed = None
    rig.check_rows()
    rig.check_bystander()
    rig.check_server()
    print(f"\nfuzz: {rig.examples} examples, {rig.reconnects} reconnects, "
          f"{len(rig.bystander.frames)} bystander micro-turns, error codes {dict(sorted(rig.codes.items()))}")
