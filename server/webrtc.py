"""The WebRTC transport: `POST /v1/realtime/calls` (SDP offer in, SDP answer out) over aiortc.

The offer comes bare or in OpenAI's multipart form with a session config (server/webrtc_offer.py).

Browsers cancel echo only for audio that arrives on an RTCPeerConnection, so this carries
the same session as `WS /v1/realtime` for them: Opus audio both ways on tracks, and the
JSON events on a data channel named "oai-events" (client events in, server events out,
exactly as the WebSocket sends them; the model's voice goes on the audio track instead of
`response.output_audio.delta`).

Nothing of the session is re-implemented here. `PeerSocket` is the small WebSocket-shaped
face of one peer connection that `connection.Connection` drives (receive, send_text,
send_bytes, close, query_params), so admission bookkeeping (`ServerState.connections`),
the tick join and the one release path, the background attach, the lifetime limits,
event dispatch, input rate checks and error mapping (server/errors.py) are the
WebSocket path's own code. `WebRTCConnection` only pins the output to the binary
transport (0x81 micro-turn frames, which `PeerSocket.send_bytes` turns into the outgoing
track). Incoming Opus is decoded by aiortc, resampled to 24 kHz mono PCM16 and handed to
the session as 0x01 input frames, so it meets the same input-ahead bound.

A call that fails (bad SDP: 400 with a JSON error; ICE not connected within
`ICE_CONNECT_TIMEOUT_S`, or ICE or DTLS failing later: the session is closed with
`webrtc_failed`, counted in `microturn_errors_total`, and released) touches no other session.
This module knows nothing about tensors or the engine.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketState

from ..model.resample import StreamResampler
from ..model.slots import SAMPLE_RATE
from . import protocol as p
from . import server_events as ev
from .auth import Grant
from .connection import Connection, ServerState
from .errors import HTTP_STATUS, ErrorCode, ProtocolError, error_payload
from .media_input import float_to_pcm16, pcm16_to_float
from .webrtc_offer import SDP_TYPE, OfferError, read_offer

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/realtime/calls"
EVENTS_CHANNEL = "oai-events"
ICE_CONNECT_TIMEOUT_S = 15.0  # offer answered -> ICE and DTLS connected, or the session is released
TRACK_RATE = 48_000
FRAME_SAMPLES = TRACK_RATE // 50  # 20 ms
INPUT_RATE = p.PCM_RATE_24K
AUDIBLE_PEAK = 64  # a 48 kHz PCM16 block whose peak is above this (about -54 dBFS) carries voice
PLAYOUT_LEAD_MS = 60  # silence put ahead of audio that resumes after an underrun: absorbs tick jitter
MAX_PLAYOUT_MS = 1000  # audio buffered for the track past this is dropped (oldest first): latency bound
MAX_CHANNEL_BUFFER = 4 << 20  # data channel bytes the peer has not taken; past it the client is slow
MAX_INBOX_MESSAGES = 1000  # client messages waiting for the receive loop (20 s of 20 ms audio frames)


class OutputTrack(MediaStreamTrack):
    """The model's voice: 16 kHz micro-turns in, 20 ms 48 kHz mono frames out, paced in real time with
    continuous pts (silence when nothing is queued). A new epoch (barge-in) drops what is queued.
    `on_frame` runs after each frame is taken; `audible_queued` says whether voice is still to go out."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._resampler = StreamResampler(SAMPLE_RATE, TRACK_RATE)
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0
        self._epoch = 0
        self._start: float | None = None
        self._pts = 0
        self._pushed = 0  # samples queued since the call began
        self._taken = 0  # samples gone out since the call began
        self._audible_until = 0  # the `_pushed` count at the end of the last block with voice in it
        self.on_frame: Callable[[], None] | None = None

    @property
    def audible_queued(self) -> bool:
        return self._taken < self._audible_until

    def push(self, pcm16: bytes, epoch: int) -> None:
        if epoch != self._epoch:
            self.flush(epoch)
        samples = float_to_pcm16(self._resampler.process(pcm16_to_float(pcm16)))
        block = np.frombuffer(samples, "<i2")
        if self._queued == 0:
            block = np.concatenate([np.zeros(TRACK_RATE * PLAYOUT_LEAD_MS // 1000, np.int16), block])
        self._queue.append(block)
        self._queued += len(block)
        self._pushed += len(block)
        if block.size and int(np.abs(block).max()) > AUDIBLE_PEAK:
            self._audible_until = self._pushed
        while self._queued > TRACK_RATE * MAX_PLAYOUT_MS // 1000 and len(self._queue) > 1:
            dropped = len(self._queue.popleft())
            self._queued -= dropped
            self._taken += dropped

    def flush(self, epoch: int) -> None:
        self._epoch = epoch
        self._taken += self._queued
        self._queue.clear()
        self._queued = 0

    def _take(self) -> np.ndarray:
        out = np.zeros(FRAME_SAMPLES, np.int16)
        filled = 0
        while filled < FRAME_SAMPLES and self._queue:
            head = self._queue[0]
            n = min(FRAME_SAMPLES - filled, len(head))
            out[filled:filled + n] = head[:n]
            filled += n
            if n == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[n:]
        self._queued -= filled
        self._taken += filled
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += FRAME_SAMPLES
            wait = self._start + self._pts / TRACK_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(self._take().reshape(1, -1), format="s16", layout="mono")
        if self.on_frame is not None:
            self.on_frame()
        frame.sample_rate = TRACK_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, TRACK_RATE)
        return frame


class PeerSocket:
    """One RTCPeerConnection shaped like the starlette WebSocket that `Connection` drives."""

    def __init__(self, pc: RTCPeerConnection, query: dict[str, str]) -> None:
        self.pc = pc
        self.query_params = {**query, "audio": "binary"}
        self.scope: dict = {}  # no abort extension: a data channel send never blocks
        self.application_state = WebSocketState.CONNECTED
        self.track = OutputTrack()
        self.track.on_frame = self._playback_events
        self._playing: tuple[str, int] | None = None  # (response id, epoch) whose voice is going out
        self.connection: WebRTCConnection | None = None
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()
        self._channel: Any = None
        self._pending: list[str] = []  # events sent before the data channel opened
        self._reader: asyncio.Task | None = None
        self._in_seq = 0
        self.connected = asyncio.Event()
        pc.on("datachannel", self._on_channel)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)

    # --- what Connection calls ---
    async def receive(self) -> dict:
        return await self._inbox.get()

    async def send_text(self, text: str) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            if self.application_state == WebSocketState.CONNECTED:
                self._pending.append(text)
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER and self.connection is not None:
            self.connection.request_close(ErrorCode.SLOW_CONSUMER, "client is not reading its events")
            return
        channel.send(text)

    async def send_bytes(self, data: bytes) -> None:
        frame = _output_frame(data)
        if frame is not None and self.connection is not None:
            self.track.push(frame, self.connection.session.epoch)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.application_state == WebSocketState.DISCONNECTED:
            return
        self.application_state = WebSocketState.DISCONNECTED
        await asyncio.sleep(0.05)  # lets a closing error event leave on the data channel
        await self.shutdown()

    async def shutdown(self) -> None:
        self.application_state = WebSocketState.DISCONNECTED
        self.track.stop()
        if self._reader is not None:
            self._reader.cancel()
        await self.pc.close()
        self._inbox.put_nowait({"type": "websocket.disconnect"})

    def _playback_events(self) -> None:
        """output_audio_buffer.started / .stopped, as OpenAI's WebRTC calls send them."""
        if self.connection is None or self.application_state != WebSocketState.CONNECTED:
            return
        session = self.connection.session
        active = session.responses.active
        if self._playing is None:
            if active is not None and self.track.audible_queued:
                self._playing = (active.id, session.epoch)
                session.send(ev.OutputAudioBufferStarted(response_id=active.id))
        elif self._playing[1] != session.epoch:
            self._playing = None  # cut off: the session sent output_audio_buffer.cleared
        elif not self.track.audible_queued and (active is None or active.id != self._playing[0]):
            session.send(ev.OutputAudioBufferStopped(response_id=self._playing[0]))
            self._playing = None

    # --- aiortc callbacks ---
    def _on_channel(self, channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL or self._channel is not None:
            return
        self._channel = channel

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            conn = self.connection
            if conn is not None and len(message) > conn.settings.max_message_bytes:
                size = conn.settings.max_message_bytes
                conn._error(ProtocolError(ErrorCode.INVALID_EVENT, f"data channel message over {size} bytes"))
                return
            key = "bytes" if isinstance(message, bytes) else "text"
            self._put({"type": "websocket.receive", key: message})

        @channel.on("open")
        def on_open() -> None:
            self._flush_pending()

        @channel.on("close")
        def on_close() -> None:  # no more events either way: the call is over
            self.application_state = WebSocketState.DISCONNECTED
            self._inbox.put_nowait({"type": "websocket.disconnect"})

        if channel.readyState == "open":
            self._flush_pending()

    def _put(self, message: dict) -> None:
        """A client message for the receive loop; a peer that floods past what it can take is closed (the data
        channel has no backpressure towards the loop, unlike a socket)."""
        if self._inbox.qsize() >= MAX_INBOX_MESSAGES:
            if self.connection is not None:
                message_ = "client sends faster than its session reads"
                self.connection.request_close(ErrorCode.INPUT_RATE_EXCEEDED, message_)
            return
        self._inbox.put_nowait(message)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for text in pending:
            self._channel.send(text)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.create_task(self._read_audio(track))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        """The browser's Opus, decoded by aiortc: 24 kHz mono PCM16 input frames for the session."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=INPUT_RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm = b"".join(bytes(out.planes[0])[: out.samples * 2] for out in resampler.resample(frame))
            if not pcm:
                continue
            pts_ms = self._in_seq * 20
            data = p.encode_frame(p.KIND_INPUT_PCM16, self._in_seq, pts_ms, pcm, p.FLAG_RATE_24K)
            self._in_seq += 1
            self._put({"type": "websocket.receive", "bytes": data})

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.connected.set()
        elif state == "failed" and self.connection is not None:
            log.info("webrtc call %s: connection failed (ICE or DTLS)", self.connection.session.id)
            message = "the WebRTC connection failed (ICE or DTLS)"
            self.connection.request_close(ErrorCode.WEBRTC_FAILED, message)
            self.application_state = WebSocketState.DISCONNECTED
        elif state in ("failed", "closed"):
            self.application_state = WebSocketState.DISCONNECTED
            self._inbox.put_nowait({"type": "websocket.disconnect"})


def _output_frame(data: bytes) -> bytes | None:
    """The PCM16 payload of a 0x81 output frame (what the session's binary transport sends)."""
    if len(data) < p.FRAME_HEADER.size or data[0] != p.KIND_OUTPUT_PCM16:
        return None
    return data[p.FRAME_HEADER.size:]


class WebRTCConnection(Connection):
    """`Connection` over a `PeerSocket`; the output stays on the binary transport (the audio track)."""

    async def _configure(self, cfg: p.SessionConfig, eid: str | None) -> None:
        await super()._configure(cfg, eid)
        self.session.output_transport = "binary"


def _error(state: ServerState, code: ErrorCode, message: str, status: int | None = None) -> JSONResponse:
    state.metrics.errors.labels(code.value).inc()
    return JSONResponse({"error": error_payload(code, message)}, status or HTTP_STATUS.get(code, 503))


_calls: dict[str, tuple[asyncio.Task, PeerSocket]] = {}  # live calls by call id (holds their tasks)


async def serve_call(request: Request, state: ServerState) -> Response:
    """POST /v1/realtime/calls: the WebSocket handshake's checks, then the SDP offer/answer."""
    headers = request.headers
    server = request.scope.get("server")
    local_addr = (str(server[0]), int(server[1])) if server and server[1] is not None else None
    if not state.auth.origin_allowed(headers.get("origin"), local_addr):
        return _error(state, ErrorCode.FORBIDDEN_ORIGIN, "Origin not allowed")
    grant = state.auth.authorize(headers.get("authorization"), None, [])
    if grant is None:
        return _error(state, ErrorCode.UNAUTHORIZED, "missing, wrong, expired or used credential")
    if state.draining:
        return _error(state, ErrorCode.SERVER_DRAINING, "server is shutting down")
    try:
        sdp, session = await read_offer(request)
    except OfferError as exc:
        return _error(state, ErrorCode.INVALID_REQUEST, str(exc), 400)
    if session is not None:  # on top of a client secret's config, as a session.update at once would be
        grant = Grant(grant.subprotocol, {**(grant.session or {}), **session})
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: the answer has host candidates
    peer = PeerSocket(pc, {k: v for k, v in request.query_params.items() if k in ("debug", "task_events")})
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # aiortc raises ValueError and others for SDP it cannot take
        await pc.close()
        return _error(state, ErrorCode.INVALID_REQUEST, f"the SDP offer is not valid: {exc}", 400)
    if not any(t.kind == "audio" for t in pc.getTransceivers()):
        await pc.close()
        return _error(state, ErrorCode.INVALID_REQUEST, "the SDP offer carries no audio media section", 400)
    if not state.ready or state.tick is None or len(state.connections) >= state.capacity:
        await pc.close()
        return _error(state, ErrorCode.SERVER_BUSY, f"all {state.capacity} session slots are taken", 503)
    if not state.tick.engine_up:
        await pc.close()
        return _error(state, ErrorCode.ENGINE_RESTARTING, "the engine is restarting; try again in a moment")
    beta = "realtime=v1" in headers.get("openai-beta", "")
    conn = WebRTCConnection(peer, state, beta)  # type: ignore[arg-type]
    peer.connection = conn
    state.connections.add(conn)  # the place is taken now, not when run() first steps (no double admission)
    pc.addTrack(peer.track)
    try:
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:
        state.connections.discard(conn)
        await pc.close()
        return _error(state, ErrorCode.INVALID_REQUEST, f"no answer to this SDP offer: {exc}", 400)
    call_id = "rtc_" + conn.session.id.removeprefix("sess_")
    task = asyncio.create_task(_run_call(conn, peer, grant))
    _calls[call_id] = (task, peer)
    task.add_done_callback(lambda _: _calls.pop(call_id, None))
    return Response(pc.localDescription.sdp, 201, media_type=SDP_TYPE,
                    headers={"Location": f"{CALLS_PATH}/{call_id}"})


async def _run_call(conn: WebRTCConnection, peer: PeerSocket, grant: Grant) -> None:
    watch = asyncio.create_task(_ice_deadline(conn, peer))
    try:
        await conn.run(grant)
    except Exception:
        log.exception("webrtc call of session %s failed", conn.session.id)
    finally:
        watch.cancel()
        await peer.shutdown()


async def _ice_deadline(conn: WebRTCConnection, peer: PeerSocket) -> None:
    try:
        await asyncio.wait_for(peer.connected.wait(), ICE_CONNECT_TIMEOUT_S)
    except TimeoutError:
        conn.request_close(ErrorCode.WEBRTC_FAILED, f"ICE did not connect within {ICE_CONNECT_TIMEOUT_S:g} s")


async def hangup_call(request: Request, state: ServerState, call_id: str) -> Response:
    """POST /v1/realtime/calls/{call_id}/hangup (OpenAI's spelling): end a call from the server side, as
    a peer leaving ends it. Needs an API key when auth is on (a call's client secret is spent)."""
    if not state.auth.http_allowed(request.headers.get("authorization")):
        return _error(state, ErrorCode.UNAUTHORIZED, "API key required")
    call = _calls.get(call_id)
    if call is None:
        return _error(state, ErrorCode.INVALID_REQUEST, f"no live call {call_id!r}", 404)
    await call[1].shutdown()
    return Response(status_code=200)
