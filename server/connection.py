"""One admitted realtime connection to its close: event dispatch, sending, lifetime limits.

server/handshake.py checks and admits a WebSocket, then runs a `Connection`: a receive
loop dispatching client events into the `Session`, a send loop draining the session's
outbox, and the lifetime limits. The receive loop only
parses, checks and hands each event to the session (config through
server/session_config.py, task events to the session's background). Client mistakes are
answered with `error` events and the session lives on. `ServerState` is what every
connection shares. This module knows nothing about tensors or how the engine steps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..model.engine_process import EngineDied
from . import protocol as p
from . import server_events as ev
from .auth import Authenticator, Grant
from .background_service import BackgroundService, SessionBackground
from .errors import ErrorCode, ProtocolError, close_code, error_payload
from .media_input import base64_decoded_min, check_input_ahead, decode_image
from .metrics import Metrics
from .resume_record import HandleRotation, restore, restore_background
from .resumption import (
    ResumeError,
    ResumeRecord,
    Resumption,
)
from .session import Session
from .session_config import apply_session_config, output_modality
from .settings import ServerSettings
from .tick_loop import TickLoop
from .transport import abort as abort_transport

log = logging.getLogger(__name__)

CLEAN_CLOSES = (1000, 1001)  # a client that closed like this ended its session; anything else may resume
CLOSE_CODE_WAIT_S = 0.5  # after the sender saw the peer go: how long the receiver may take to read why
CLOSE_SEND_TIMEOUT_S = 1.0  # how long a closing error event may take to go out; past it the socket is cut
DATA_URL_MARK = ";base64,"
ROOT_ITEM = "root"  # previous_item_id that places an item first (OpenAI's and LiveKit's spelling)


@dataclass
class ServerState:
    settings: ServerSettings
    auth: Authenticator
    metrics: Metrics
    tick: TickLoop | None = None  # set once the engine is up
    capacity: int = 0  # concurrent sessions admitted
    ready: bool = False
    draining: bool = False
    connections: set[Connection] = field(default_factory=set)
    background: BackgroundService | None = None  # background tasks of live sessions, when enabled
    resume: Resumption | None = None  # handles, replay cache and parked sessions (set by the app)


async def refuse(ws: WebSocket, state: ServerState, code: ErrorCode, message: str) -> None:
    state.metrics.errors.labels(code.value).inc()
    await ws.send_text(ev.dump_event(ev.ErrorEvent(error=error_payload(code, message))))
    await ws.close(close_code(code) or 1011, code.value)


def b64decode(data: str, code: ErrorCode, event_id: str | None) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(code, "field is not valid base64", event_id) from None


class Connection:
    def __init__(self, ws: WebSocket, state: ServerState, beta: bool, session: Session | None = None,
                 bind: str = "", resumable: bool = False) -> None:
        """`session`: a parked session this connection takes over; `bind` the digest of the credentials
        that opened it (for its handles); `resumable`: it gets handles and may be parked."""
        self.ws = ws
        self.state = state
        self.settings = state.settings
        self.resumable = resumable
        self._bind = bind
        self._reattached = session is not None
        engine = state.tick.engine
        self.session = session or Session(
            self.settings,
            engine.tokenizer,
            engine.config.text_in_slots,
            engine.config.text_out_slots,
            on_overflow=self._on_overflow,
            beta=beta,
            hears=engine.hears,
            on_fatal=self.request_close,
            audio_tokens_per_turn=engine.config.audio_tokens,
        )
        self._closing: asyncio.Future[tuple[ErrorCode, str]] = asyncio.get_running_loop().create_future()
        self._last_message = time.monotonic()
        self._rate_error_sent = False
        self._left: asyncio.Future | None = None  # the queued leave, once the slot is given back
        if session is not None:
            session.rebind(self._on_overflow, self.request_close)
        self._handover: asyncio.Future[Session | None] | None = None  # set when a reconnect takes the session
        self._disconnect_code: int | None = None  # the peer's close code (1006: no close frame)
        self._record_version = 0  # bumped by client changes the record key cannot see
        self._handles = (HandleRotation(self.session, state.resume, bind, lambda: self._record_version)
                         if resumable and state.resume is not None else None)

    def _on_overflow(self) -> None:
        self.request_close(ErrorCode.SLOW_CONSUMER, "client is not reading its output")

    def hand_over(self) -> asyncio.Future[Session | None]:
        """Give the session to a reconnect: this connection closes, the session and its slot live on."""
        if self._handover is None:
            self._handover = asyncio.get_running_loop().create_future()
            message = "the session was resumed by a new connection"
            self.request_close(ErrorCode.SESSION_RESUMED_ELSEWHERE, message)
        return self._handover

    def request_close(self, code: ErrorCode, message: str) -> None:
        if not self._closing.done():
            self._closing.set_result((code, message))

    async def run(self, grant: Grant, record: ResumeRecord | None = None,
                  undo: Callable[[], None] = lambda: None) -> None:
        """Serve the session: a new one, one rebuilt from `record`, or a parked one taken over; `undo` gives
        the redeemed handle back when the session cannot be opened."""
        state, session = self.state, self.session
        state.connections.add(self)
        state.metrics.sessions.inc()
        state.metrics.active_sessions.set(len(state.connections))
        tasks: list[asyncio.Task] = []
        try:
            if not self._reattached and not await self._open(grant, record):
                undo()
                return
            created = ev.SessionCreated(session=session.session_dict())
            if self._handles is not None:
                created = ev.SessionCreated(session=created.session, resumption=await self._handles.seal())
            session.send(created)
            tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._send_loop())]
            if self.settings.max_session_s or self.settings.idle_timeout_s:
                tasks.append(asyncio.create_task(self._watch_limits()))
            if self._handles is not None:
                tasks.append(asyncio.create_task(self._handles.run()))
            await asyncio.wait([*tasks, self._closing], return_when=asyncio.FIRST_COMPLETED)
            if not self._closing.done() and not tasks[0].done():
                # the sender saw the peer go first: the receiver is about to read its close code
                await asyncio.wait([tasks[0]], timeout=CLOSE_CODE_WAIT_S)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("session %s failed", session.id, exc_info=task.exception())
                    self.request_close(ErrorCode.INTERNAL_ERROR, "internal error")
            if self._closing.done():
                if self._handover is None:
                    self._release()  # before the close frame: a client reconnecting on it finds the slot free
                await self._close(*self._closing.result())
        finally:
            for task in tasks:
                task.cancel()
            if not self._keep_session():
                session.close()
                await self._release()

    async def _open(self, grant: Grant, record: ResumeRecord | None) -> bool:
        """Configure (from the client secret, or the resumed record), join and attach; False: refused."""
        state, session = self.state, self.session
        engine = state.tick.engine
        if record is not None:
            try:
                restore(session, record, engine.config.prefix_len, lambda t: len(engine.tokenizer.encode(t)))
            except ResumeError as exc:
                await refuse(self.ws, state, exc.code, exc.message)
                return False
        elif grant.session:
            try:
                await self._configure(p.SessionConfig.model_validate(grant.session), None)
            except ProtocolError as exc:  # e.g. transcription asked of a model that does not hear
                message = f"the client secret's session config is refused: {exc.message}"
                await refuse(self.ws, state, ErrorCode.INVALID_REQUEST, message)
                return False
        if self.ws.query_params.get("audio") == "binary":
            session.output_transport = "binary"
        try:
            await state.tick.join(session)
        except EngineDied:
            message = "the engine stopped; reconnect in a moment"
            await refuse(self.ws, state, ErrorCode.ENGINE_RESTARTING, message)
            return False
        except RuntimeError:  # EngineFull: slots held by sessions still leaving
            await refuse(self.ws, state, ErrorCode.SERVER_BUSY, "no free engine slot")
            return False
        if self.ws.query_params.get("debug") == "1":
            session.debug = True
        if self.ws.query_params.get("task_events") == "1":
            session.task_events = True
        if state.background is not None:
            session.attach_background(state.background.for_session(session.id, session.send_task_event))
            if record is not None:
                restore_background(session.background, record)
        return True

    def _keep_session(self) -> bool:
        """At the end of this connection: hand the session to a reconnect, or park it after an unclean close
        (slot kept for resume_grace_s); False: it ends with the connection."""
        state, session = self.state, self.session
        if self._handover is not None:
            keep = not session.failed
            if keep:
                self._detach()
            if not self._handover.done():
                self._handover.set_result(session if keep else None)
            return keep
        unclean = self._disconnect_code not in CLEAN_CLOSES
        live = not (self._closing.done() or state.draining or session.failed or session.slot is None)
        grace = state.resume.grace_s if state.resume is not None else 0.0
        if self._handles is not None and state.resume is not None and unclean and live and grace > 0:
            self._detach()
            state.resume.parked.park(session, state.resume.grace_s)
            log.info("session %s parked for %.0f s after an unclean close (%s)", session.id,
                     state.resume.grace_s, self._disconnect_code)
            return True
        return False

    def _detach(self) -> None:
        self.session.detach()
        self.state.connections.discard(self)
        self.state.metrics.active_sessions.set(len(self.state.connections))

    async def migrate(self, time_left_ms: int) -> None:
        """The drain: running background tasks are cancelled (`migrated`: their finished results are in the
        handle), the last handle goes out, then `session.go_away`."""
        session = self.session
        if self._handles is not None and not self._handles.stopped:
            if session.background is not None:
                session.background.close("migrated")
            try:
                session.send(await self._handles.last())
            except Exception:  # the go_away still goes out: the client reconnects fresh
                log.exception("session %s: sealing its last handle failed", session.id)
        session.send(ev.SessionGoAway(time_left_ms=time_left_ms))

    def _release(self) -> asyncio.Future:
        """Give the engine row and the admission place back, once. The leave is queued on the tick thread
        ahead of any later join, so the next connection can be admitted at once (no 1013 race)."""
        if self._left is None:
            self._left = self.state.tick.leave_soon(self.session)
            self.state.connections.discard(self)
            self.state.metrics.active_sessions.set(len(self.state.connections))
        return self._left

    async def _close(self, code: ErrorCode, message: str) -> None:
        self.state.metrics.errors.labels(code.value).inc()
        if self.ws.application_state != WebSocketState.CONNECTED:
            return
        try:
            event = ev.dump_event(ev.ErrorEvent(error=error_payload(code, message)), self.session.beta)
            await asyncio.wait_for(self.ws.send_text(event), CLOSE_SEND_TIMEOUT_S)
            await asyncio.wait_for(self.ws.close(close_code(code) or 1000, code.value), CLOSE_SEND_TIMEOUT_S)
        except TimeoutError:
            # stuck behind a send buffer the peer does not drain: a graceful close would flush first and so
            # hold the socket, its buffers and its fd for as long as the peer likes
            if not abort_transport(self.ws.scope):
                log.warning("session %s: the server offers no way to cut a stuck connection", self.session.id)
        except (RuntimeError, WebSocketDisconnect):
            pass  # the peer is gone

    async def _send_loop(self) -> None:
        session = self.session
        while True:
            await session.outbox_ready.wait()
            message = session.pop_message()
            if message is None:
                continue
            try:
                if isinstance(message, bytes):
                    await self.ws.send_bytes(message)
                else:
                    await self.ws.send_text(message)
            except WebSocketDisconnect as exc:
                self._disconnect_code = exc.code
                return  # the peer left; the receive loop sees it too
            except RuntimeError:
                # the ASGI server refuses sends once it has closed the socket itself (1009 for an
                # oversized message, or our own close racing this loop): the connection is over, not
                # broken, and the receive loop sees the disconnect
                return

    async def _watch_limits(self) -> None:
        limit, idle = self.settings.max_session_s, self.settings.idle_timeout_s
        while True:
            now = time.monotonic()
            if limit and now - self.session.created_at >= limit:
                return self.request_close(ErrorCode.SESSION_EXPIRED, f"session reached {limit} s")
            if idle and now - self._last_message >= idle:
                return self.request_close(ErrorCode.IDLE_TIMEOUT, f"no client message for {idle} s")
            await asyncio.sleep(min(x for x in (limit, idle, 1.0) if x))

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self._disconnect_code = message.get("code")
                return
            self._last_message = time.monotonic()
            try:
                if message.get("bytes") is not None:
                    await self._on_binary(message["bytes"])
                elif message.get("text") is not None:
                    await self._on_event(p.parse_client_event(message["text"]))
            except ProtocolError as exc:
                self._error(exc)

    def _error(self, exc: ProtocolError) -> None:
        if exc.code == ErrorCode.INPUT_RATE_EXCEEDED:
            if self._rate_error_sent:
                return  # one error per burst, not one per dropped packet
            self._rate_error_sent = True
        self.state.metrics.errors.labels(exc.code.value).inc()
        self.session.send(ev.ErrorEvent(error=error_payload(exc.code, exc.message, exc.event_id, exc.param)))

    def _check_room(self, pcm_bytes: int, rate: int, event_id: str | None) -> None:
        """The input-ahead bound from the size alone: an unpaced flood is refused before it is decoded."""
        buffered_ms, max_ahead_ms = self.session.input_buffered_ms, self.settings.max_input_ahead_ms
        check_input_ahead(pcm_bytes, rate, buffered_ms, max_ahead_ms, event_id)

    def _append_audio(self, pcm: bytes, rate: int, event_id: str | None) -> None:
        self._check_room(len(pcm), rate, event_id)
        self.session.append_audio(pcm, rate, event_id)
        self._rate_error_sent = False

    def _append_base64_audio(self, audio: str, event_id: str | None) -> None:
        rate = self.session.input_rate
        self._check_room(base64_decoded_min(len(audio)), rate, event_id)
        self._append_audio(b64decode(audio, ErrorCode.INVALID_AUDIO, event_id), rate, event_id)

    async def _on_binary(self, data: bytes) -> None:
        frame = p.decode_frame(data)
        event_id = p.frame_event_id(frame.seq)
        if frame.kind == p.KIND_INPUT_PCM16:
            rate = p.PCM_RATE_24K if frame.flags & p.FLAG_RATE_24K else p.PCM_RATE_16K
            self._append_audio(frame.payload, rate, event_id)
        else:
            image = await decode_image(frame.payload, event_id, self.settings.max_image_pixels)
            self.session.set_image(image)

    async def _on_event(self, event: Any) -> None:
        session, eid = self.session, event.event_id
        if isinstance(event, p.SessionUpdate | p.ConversationItemTruncate):
            self._record_version += 1
        if isinstance(event, p.SessionUpdate):
            await self._configure(event.session, eid)
            session.send(ev.SessionUpdated(session=session.session_dict()))
        elif isinstance(event, p.InputAudioBufferAppend):
            self._append_base64_audio(event.audio, eid)
        elif isinstance(event, p.InputAudioBufferCommit):
            session.commit_audio()
        elif isinstance(event, p.InputAudioBufferClear):
            session.clear_audio()
        elif isinstance(event, p.ConversationItemCreate):
            await self._add_item(event.item, eid, event.previous_item_id)
        elif isinstance(event, p.ConversationItemTruncate):
            session.truncate(event.item_id, event.content_index, event.audio_end_ms, eid)
        elif isinstance(event, p.ConversationItemDelete):
            session.delete_item(event.item_id, eid)
        elif isinstance(event, p.ConversationItemRetrieve):
            if event.item_id not in session.conversation:
                message = f"item {event.item_id!r} is not in the conversation"
                raise ProtocolError(ErrorCode.ITEM_RETRIEVE_INVALID_ITEM_ID, message, eid, "item_id")
            session.send(ev.ConversationItemRetrieved(item=session.conversation.get(event.item_id)))
        elif isinstance(event, p.ResponseCreate):
            self._create_response(event.response or p.ResponseParams(), eid)
        elif isinstance(event, p.ResponseCancel):
            active = session.responses.active
            if active is not None and event.response_id in (None, active.id):
                session.barge_in("client_cancelled")
        elif isinstance(event, p.OutputAudioBufferClear):
            session.barge_in("client_cancelled")
        elif isinstance(event, p.TaskCreate):
            session.task_events = True  # it asked for a task: it takes task events
            task = event.task
            if len(task.input) > self.settings.max_task_input_chars:
                message = f"task input over {self.settings.max_task_input_chars} characters"
                raise ProtocolError(ErrorCode.TEXT_TOO_LONG, message, eid, "task.input")
            try:
                self._background(eid).submit(
                    task.input, task.scheduling, tool=task.tool, timeout_s=task.timeout_s, client_event_id=eid
                )
            except ValueError as exc:
                raise ProtocolError(ErrorCode.INVALID_EVENT, str(exc), eid, "task.scheduling") from exc
        elif isinstance(event, p.TaskCancel):
            session.task_events = True
            if not self._background(eid).cancel(event.task_id):
                message = f"no running task {event.task_id!r} in this session"
                raise ProtocolError(ErrorCode.UNKNOWN_TASK, message, eid, "task_id")

    def _background(self, eid: str | None) -> SessionBackground:
        if self.session.background is None:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "background tasks are not enabled", eid)
        return self.session.background

    def _create_response(self, params: p.ResponseParams, eid: str | None) -> None:
        """response.create: the model is asked to speak; what the one response cannot honour is refused."""
        session = self.session
        for name in ("input", "tools", "tool_choice"):
            if getattr(params, name):
                message = f"response.{name} is not supported: the model answers from the live conversation"
                raise ProtocolError(ErrorCode.UNSUPPORTED, message, eid, f"response.{name}")
        if params.conversation not in (None, "auto"):
            message = "response.conversation: only 'auto' (every response joins the conversation)"
            raise ProtocolError(ErrorCode.UNSUPPORTED, message, eid, "response.conversation")
        if params.output_modalities is not None:
            modality = output_modality(params.output_modalities, eid, "response.output_modalities")
            if modality != session.responses.modality:
                message = "response.output_modalities must match the session's (set them with session.update)"
                raise ProtocolError(ErrorCode.UNSUPPORTED, message, eid, "response.output_modalities")
        if params.max_output_tokens is not None and params.max_output_tokens != "inf":
            message = "response.max_output_tokens: set it with session.update"
            raise ProtocolError(ErrorCode.UNSUPPORTED, message, eid, "response.max_output_tokens")
        p.check_metadata(params.metadata, eid)
        if params.instructions:
            self._check_text(params.instructions, eid, "response.instructions")
        session.responses.request(params.metadata, eid)
        if params.instructions:
            session.queue_text(params.instructions, eid)

    def _check_text(self, text: str, eid: str | None, param: str) -> None:
        if len(text) > self.settings.max_text_chars:
            message = f"text over {self.settings.max_text_chars} characters"
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, message, eid, param)

    async def _add_item(self, item: p.Item | p.FunctionCallOutputItem, eid: str | None,
                        previous_item_id: str | None = None) -> None:
        conversation = self.session.conversation
        if item.id is not None:
            conversation.check_new_id(item.id, eid)
        previous = None if previous_item_id == ROOT_ITEM else previous_item_id
        conversation.check_previous(previous, eid)
        if isinstance(item, p.FunctionCallOutputItem):
            self._function_call_output(item, eid, previous_item_id)
            return
        text = "".join(part.text for part in item.content if isinstance(part, p.InputText))
        self._check_text(text, eid, "item.content")
        if item.role != "user":  # system and assistant text join the record; the model reads user text only
            if any(not isinstance(part, p.InputText) for part in item.content):
                message = f"a {item.role} item carries text only"
                raise ProtocolError(ErrorCode.UNSUPPORTED, message, eid, "item.content")
            part = "output_text" if item.role == "assistant" else "input_text"
            added = self._item_dict(item, [{"type": part, "text": text}])
            self._announce(added, previous_item_id)
            if self.session.background is not None:
                role = "model" if item.role == "assistant" else "system"
                self.session.background.record.add_text(role, text, item_id=added["id"])
            return
        for part in item.content:
            if isinstance(part, p.InputImage):
                _, mark, payload = part.image_url.partition(DATA_URL_MARK)
                if not mark:
                    raise ProtocolError(ErrorCode.INVALID_IMAGE, "image_url must be a base64 data URL", eid)
                data = b64decode(payload, ErrorCode.INVALID_IMAGE, eid)
                image = await decode_image(data, eid, self.settings.max_image_pixels)
                self.session.set_image(image)
            elif isinstance(part, p.InputAudio):
                self._append_base64_audio(part.audio, eid)
        added = self._item_dict(item, [{"type": "input_text", "text": part.text} for part in item.content
                                       if isinstance(part, p.InputText)])
        if text:
            self.session.queue_text(text, eid, added["id"])
        self._announce(added, previous_item_id)

    @staticmethod
    def _item_dict(item: p.Item, content: list[dict]) -> dict:
        return {"id": item.id or p.new_id("item"), "object": "realtime.item", "type": "message",
                "role": item.role, "status": "completed", "content": content}

    def _announce(self, item: dict, previous_item_id: str | None) -> None:
        """Add a client item to the conversation and confirm it (added, then done)."""
        previous = None if previous_item_id == ROOT_ITEM else previous_item_id
        before = self.session.conversation.add(dict(item), previous, first=previous_item_id == ROOT_ITEM)
        self.session.send(ev.ConversationItemAdded(item=item, previous_item_id=before))
        self.session.send(ev.ConversationItemDone(item=item, previous_item_id=before))

    def _function_call_output(self, item: p.FunctionCallOutputItem, eid: str | None,
                              previous_item_id: str | None) -> None:
        background = self._background(eid)
        if len(item.output) > self.settings.max_text_chars:
            message = f"output over {self.settings.max_text_chars} characters"
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, message, eid, "item.output")
        if not background.function_call_output(item.call_id, item.output):
            message = f"no client tool call {item.call_id!r} is waiting in this session"
            raise ProtocolError(ErrorCode.UNKNOWN_CALL, message, eid, "item.call_id")
        added = {"id": item.id or p.new_id("item"), "object": "realtime.item", "type": "function_call_output",
                 "call_id": item.call_id, "output": item.output, "status": "completed"}
        self._announce(added, previous_item_id)

    async def _configure(self, cfg: p.SessionConfig, eid: str | None) -> None:
        """Apply a session config all-or-nothing; a new prefix or sampling re-joins the slot."""
        restart = apply_session_config(self.session, cfg, eid)
        if cfg.task_events is not None:
            self.session.task_events = cfg.task_events
        if restart and self.session.slot is not None:
            try:
                await self.state.tick.rejoin(self.session)
            except EngineDied:  # the session holds no row now: it cannot go on
                self.request_close(ErrorCode.ENGINE_RESTARTING, "the engine stopped; reconnect in a moment")
