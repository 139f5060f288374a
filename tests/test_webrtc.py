"""WebRTC transport end to end: an aiortc client against a real server (tiny engine), espeak speech.

The client posts its SDP offer to `POST /v1/realtime/calls`, sends speech on its audio
track and reads the server's events on the "oai-events" data channel and the model's
voice on the remote track; a bad offer is refused with 400 while a WebSocket session on
the same server keeps going; a call whose ICE never connects is released.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Iterator

import av
import httpx
import numpy as np
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from helpers.realserver import ServerThread, collect, demo_engine, demo_settings, stream_binary, warm_engine
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from microturn.model.resample import resample
from microturn.server import webrtc
from microturn.server.settings import ServerSettings
from microturn.training.espeak import speak

MAX_SLOTS = 4
RATE = 48_000
FRAME = RATE // 50


@pytest.fixture(scope="module")
def engine():
    return warm_engine(MAX_SLOTS)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speak("Hello there. The quick brown fox jumps over the lazy dog.", rate=16_000)


@pytest.fixture
def server(engine) -> Iterator[ServerThread]:
    with ServerThread(ServerSettings(max_sessions=MAX_SLOTS), engine) as srv:
        yield srv


class SpeechTrack(MediaStreamTrack):
    """A microphone that says `samples` (48 kHz float) once, then silence, in real-time 20 ms frames."""

    kind = "audio"

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__()
        self.pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        self.pts = 0
        self.start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        else:
            self.pts += FRAME
            await asyncio.sleep(max(0.0, self.start + self.pts / RATE - time.monotonic()))
        chunk = self.pcm[self.pts:self.pts + FRAME]
        chunk = np.pad(chunk, (0, FRAME - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.pts, fractions.Fraction(1, RATE)
        return frame


class Call:
    """One aiortc client call: events from the data channel, decoded samples from the remote track."""

    def __init__(self, samples: np.ndarray | None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel(webrtc.EVENTS_CHANNEL)
        self.events: list[dict] = []
        self.audio: list[np.ndarray] = []
        self.opened = asyncio.Event()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.mic = SpeechTrack(samples if samples is not None else np.zeros(RATE, np.float32))
        self.pc.addTrack(self.mic)
        self.pc.on("track", self._on_track)
        self._readers: list[asyncio.Task] = []

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                self.audio.append(frame.to_ndarray().astype(np.float32).ravel() / 32768)

        self._readers.append(asyncio.create_task(read()))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, url: str, headers: dict | None = None) -> httpx.Response:
        sdp = await self.offer()
        async with httpx.AsyncClient() as client:
            reply = await client.post(url, content=sdp,
                                      headers={"Content-Type": "application/sdp", **(headers or {})})
        if reply.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
        return reply

    async def wait_for(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event["type"] == kind:
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {kind} within {timeout} s; got {[e['type'] for e in self.events]}")

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        await self.pc.close()


def calls_url(srv: ServerThread) -> str:
    return f"{srv.http_url}{webrtc.CALLS_PATH}"


async def test_call_carries_events_and_audio_both_ways(server, speech):
    call = Call(resample(speech, 16_000, RATE))
    try:
        reply = await call.connect(calls_url(server))
        assert reply.status_code == 201, reply.text
        assert reply.headers["content-type"].startswith("application/sdp")
        assert reply.headers["location"].startswith(webrtc.CALLS_PATH + "/rtc_")
        assert "m=audio" in reply.text
        await asyncio.wait_for(call.opened.wait(), 10)
        created = await call.wait_for("session.created", 10)
        assert created["session"]["id"].startswith("sess_")
        await call.wait_for("input_audio_buffer.speech_started", 15)
        # the channel is a full client-event path: a bad event is answered, the session lives on
        call.channel.send(json.dumps({"type": "no.such.event", "event_id": "e1"}))
        error = await call.wait_for("error", 5)
        assert error["error"]["event_id"] == "e1"
        call.channel.send(json.dumps({"type": "session.update", "session": {"instructions": "hi"}}))
        await call.wait_for("session.updated", 5)
        await asyncio.sleep(1.0)
        assert not any(e["type"].endswith("output_audio.delta") for e in call.events)
        heard = np.concatenate(call.audio)
        assert len(heard) > RATE, "under a second of audio on the remote track"
        assert float(np.sqrt(np.mean(heard ** 2))) > 1e-3, "the remote track carries no energy"
        assert len(server.app.state.server.connections) == 1
    finally:
        await call.close()
    deadline = time.monotonic() + 5
    while server.app.state.server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not server.app.state.server.connections, "the hung-up call still holds its session"


async def test_a_reply_is_framed_by_output_audio_buffer_started_and_stopped():
    """As OpenAI's WebRTC calls do: `started` once a response's voice goes out on the track, `stopped`
    once all of it has, after the response is done; both validate against the `openai` models."""
    with ServerThread(demo_settings(1), demo_engine(1)) as srv:
        call = Call(None)
        try:
            assert (await call.connect(calls_url(srv))).status_code == 201
            await call.wait_for("session.created", 10)
            text = [{"type": "input_text", "text": "hello there"}]
            item = {"type": "message", "role": "user", "content": text}
            call.channel.send(json.dumps({"type": "conversation.item.create", "item": item}))
            stopped = await call.wait_for("output_audio_buffer.stopped", 20)
        finally:
            await call.close()
    kinds = [e["type"] for e in call.events]
    started = next(e for e in call.events if e["type"] == "output_audio_buffer.started")
    done = next(e for e in call.events if e["type"] == "response.done")
    assert started["response_id"] == stopped["response_id"] == done["response"]["id"]
    assert kinds.index("response.created") < kinds.index("output_audio_buffer.started")
    assert kinds.index("response.done") < kinds.index("output_audio_buffer.stopped")
    adapter = TypeAdapter(RealtimeServerEvent)
    for event in (started, stopped):
        adapter.validate_python(event, strict=True)


async def test_bad_offer_is_400_and_a_websocket_session_keeps_going(server, speech):
    async with websockets.connect(server.ws_url + "?audio=binary") as ws:
        await collect(ws, 5, until=lambda e: e["type"] == "session.created")
        async with httpx.AsyncClient() as client:
            bad = await client.post(calls_url(server), content="v=0\r\nthis is no SDP",
                                    headers={"Content-Type": "application/sdp"})
            empty = await client.post(calls_url(server), content="",
                                      headers={"Content-Type": "application/sdp"})
            json_body = await client.post(calls_url(server), json={"sdp": "v=0"})
        for reply in (bad, empty, json_body):
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["code"] == "invalid_request"
        assert "SDP" in bad.json()["error"]["message"]
        await stream_binary(ws, speech[: 16_000 * 2], 16_000)
        frames, events = await collect(ws, 3)
        assert frames, "the WebSocket session stopped after a bad WebRTC offer"
        assert not any(e["type"] == "error" for e in events)


async def test_the_multipart_offer_form_carries_a_session_config(server):
    """OpenAI's GA form: `sdp` and `session` fields; the session starts with that config, and a config
    the server refuses is a 400 before any session exists."""
    call = Call(None)
    try:
        sdp = await call.offer()
        async with httpx.AsyncClient() as client:
            form = {"sdp": (None, sdp), "session": (None, '{"seed": "x"}')}
            bad = await client.post(calls_url(server), files=form)
            assert bad.status_code == 400 and "session" in bad.json()["error"]["message"], bad.text
            assert not server.app.state.server.connections
            config = json.dumps({"type": "realtime", "instructions": "Be brief."})
            form = {"sdp": (None, sdp), "session": (None, config)}
            reply = await client.post(calls_url(server), files=form)
        assert reply.status_code == 201, reply.text
        await call.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
        created = await call.wait_for("session.created", 10)
        assert created["session"]["instructions"] == "Be brief."
    finally:
        await call.close()


async def test_call_needs_the_credential(engine):
    settings = ServerSettings(max_sessions=MAX_SLOTS, api_keys=["sk-test"])
    with ServerThread(settings, engine) as srv:
        call = Call(None)
        try:
            assert (await call.connect(calls_url(srv))).status_code == 401
        finally:
            await call.close()
        call = Call(None)
        try:
            reply = await call.connect(calls_url(srv), {"Authorization": "Bearer sk-test"})
            assert reply.status_code == 201
            await call.wait_for("session.created", 10)
        finally:
            await call.close()


async def test_hangup_ends_the_call_and_frees_its_session(server):
    call = Call(None)
    try:
        reply = await call.connect(calls_url(server))
        assert reply.status_code == 201
        await call.wait_for("session.created", 10)
        hangup = f"{server.http_url}{reply.headers['location']}/hangup"
        async with httpx.AsyncClient() as client:
            assert (await client.post(hangup)).status_code == 200
            state = server.app.state.server
            deadline = time.monotonic() + 5
            while state.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not state.connections
            # the call's task ends a moment after its place is given back (its leave is queued first)
            while (again := await client.post(hangup)).status_code == 200 and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.05)
            assert again.status_code == 404 and again.json()["error"]["code"] == "invalid_request"
    finally:
        await call.close()


WEBRTC_FAILED = 'microturn_errors_total{code="webrtc_failed"}'


def _failed_calls(srv: ServerThread) -> float:
    try:
        return srv.metric(WEBRTC_FAILED)
    except KeyError:  # no call has failed on this server yet
        return 0.0


async def test_a_dtls_failure_closes_only_its_call(server, speech):
    """An offer whose certificate fingerprint does not match the certificate the client then shows: the
    server's DTLS handshake fails, its session is closed (webrtc_failed) and released, and a WebSocket
    session beside it streams on without a gap."""
    async with websockets.connect(server.ws_url + "?audio=binary") as ws:
        await collect(ws, 5, until=lambda e: e["type"] == "session.created")
        call = Call(None)
        try:
            sdp = await call.offer()
            wrong = "a=fingerprint:sha-256 " + ":".join(["00"] * 32)
            lines = [wrong if line.startswith("a=fingerprint:") else line for line in sdp.splitlines()]
            async with httpx.AsyncClient() as client:
                reply = await client.post(calls_url(server), content="\r\n".join(lines) + "\r\n",
                                          headers={"Content-Type": "application/sdp"})
            assert reply.status_code == 201, reply.text
            await call.pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
            feed = asyncio.create_task(stream_binary(ws, speech, 16_000))
            state = server.app.state.server
            deadline = time.monotonic() + 20
            while len(state.connections) > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(state.connections) == 1, "the call whose DTLS failed still holds its session"
            frames, events = await collect(ws, 2)
            await feed
        finally:
            await call.close()
        seqs = [f.seq for f in frames]
        assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert not any(e["type"] == "error" for e in events), events
    assert _failed_calls(server) == 1


async def test_ice_that_never_connects_releases_the_session(server, monkeypatch):
    monkeypatch.setattr(webrtc, "ICE_CONNECT_TIMEOUT_S", 1.5)
    call = Call(None)
    sdp = await call.offer()
    await call.close()  # the client is gone before it ever takes the answer
    async with httpx.AsyncClient() as client:
        reply = await client.post(calls_url(server), content=sdp, headers={"Content-Type": "application/sdp"})
    assert reply.status_code == 201
    state = server.app.state.server
    assert len(state.connections) == 1
    deadline = time.monotonic() + 10
    while state.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not state.connections, "a call whose ICE never connected still holds its session"
    assert _failed_calls(server) == 1
