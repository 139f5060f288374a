"""Per-session state: config, text-in queues, epochs and the outbox; one micro-turn in and out per tick.

Two threads touch a `Session`: the event loop (client input, `deliver`) and the tick
thread (`take_input` and `skip_input`, once per tick). The input audio buffer
(server/media_input.py) is the shared state and guards itself with a lock; the text-in
deques are appended to by the loop and popped by the tick thread only; the tick thread
also reads (and clears `stop_requested` of) a few plain fields of `responses` (the wait
bias a pending `response.create` or push to talk asks for, the modality), single reads
and writes under the GIL; everything else is event-loop only.

Input goes in through `append_audio` / `commit_audio` / `clear_audio`, `set_image` and
`queue_text`; `take_input` turns it into this tick's `SlotInput`. `deliver` takes the
tick's output: voice activity, barge-in detection and the user's transcript come from
server/turn_events.py, background work from the `SessionBackground` attached to it
(server/background_service.py, when the server runs background tasks), and the
micro-turn's audio and text are encoded and queued (bounded) for the connection's
sender, tagged with the epoch so a barge-in drops output that is stale. Config changes
arrive checked, through `configure` (server/session_config.py maps the client's config).
This module knows nothing about sockets or the engine's internals.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from ..model.resample import StreamResampler
from ..model.slots import MAX_WAIT_BIAS_OFFSET, SAMPLE_RATE, SamplingParams, SlotInput, SlotOutput
from ..model.tokenizer import ByteTokenizer
from . import protocol as p
from . import server_events as ev
from .background import ToolSpec
from .background_service import SessionBackground
from .conversation import Conversation
from .errors import ErrorCode, ProtocolError, error_payload
from .media_input import TURN_MS, InputAudioBuffer, float_to_pcm16, pcm16_to_float
from .responses import Responses
from .settings import ServerSettings
from .turn_events import TurnEvents

BACKGROUND_QUEUE_TURNS = 2  # background text held in the text-in queue, in micro-turns of text-in slots
# turn_detection.eagerness -> nats on the model's "stay silent" each tick (over the checkpoint's own
# calibrated bias): low waits longer before taking the turn, high takes it sooner
EAGERNESS_WAIT_BIAS = {"low": 2.0, "medium": 0.0, "high": -2.0, "auto": 0.0}


class Session:
    """One realtime session's state between its connection (event loop) and the tick loop."""

    def __init__(
        self,
        settings: ServerSettings,
        tokenizer: ByteTokenizer,
        text_in_slots: int,
        text_out_slots: int,
        on_overflow: Callable[[], None],
        beta: bool = False,
        hears: bool = False,
        on_fatal: Callable[[ErrorCode, str], None] | None = None,
        audio_tokens_per_turn: int = 4,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or p.new_id("sess")  # a resumed session keeps the id it had
        self.settings = settings
        self.beta = beta  # beta spellings of server events
        self.slot: int | None = None
        self.closed = False
        self.failed = False  # a tick stage raised for this session: no more micro-turns, it is closing
        self._on_fatal = on_fatal  # closes the connection with a code (the session cannot close itself)
        self.created_at = time.monotonic()
        # sampling and prefix: changing either re-joins the engine slot
        self.client_instructions = ""  # as the client set them (session.update)
        # a resumed session's record tail (server/resumption.py), pinned after the instructions
        self.restored_context = ""
        self.detached = False  # parked after an unclean close: output is dropped until a reconnect
        self.resume_gen = 0  # generation of the next resumption handle (the replay cache's order)
        self.sampling = SamplingParams()
        self.eagerness = "auto"  # turn_detection.eagerness, as a per-tick wait bias (EAGERNESS_WAIT_BIAS)
        # as session.updated reports it; None = push to talk
        self.turn_detection: dict | None = {"type": "semantic_vad", "eagerness": "auto",
                                            "create_response": True, "interrupt_response": True}
        self.tools: list[ToolSpec] = []  # declared tools, offered to background work
        self.tool_choice: str | dict = "auto"  # "auto", "none", or {"type": "function", "name": ...}
        # transcripts of the user's speech: the model's own reading of its audio-in, where it was trained
        # for that (Engine.hears); on by default there, and audio.input.transcription = null turns it off
        self.hears = hears
        self.transcribe = hears
        self.debug = settings.debug_events  # send debug.text_in events
        self.task_events = settings.task_events  # send task.* events (microturn's own, not OpenAI's)
        # input
        self._audio_in = InputAudioBuffer(settings.jitter_ms, settings.max_input_ahead_ms)
        self.input_rate = p.DEFAULT_PCM_RATE
        self._tokenizer = tokenizer
        self._text_in_slots = text_in_slots
        self._text_out_slots = text_out_slots
        self._text: deque[int] = deque()
        self._background: deque[tuple[int, int]] = deque()  # (epoch, token)
        self._scripted: deque[int] = deque()  # text-out tokens to force (constrained decoding)
        self._image: np.ndarray | None = None
        self._image_lock = threading.Lock()
        # output
        self.output_transport = settings.output_audio
        self.output_rate = settings.output_rate
        self._out_resampler = StreamResampler(SAMPLE_RATE, self.output_rate)
        self.seq = 0  # output micro-turns produced
        self.epoch = 0  # bumped on barge-in
        self.conversation = Conversation()
        self.responses = Responses(self.send, lambda event: self._push(ev.dump_event(event, self.beta), True),
                                   self.conversation, audio_tokens_per_turn, lambda: self.output_rate)
        self.responses.on_item_text = self._on_item_text
        self.outbox: deque[tuple[int, bool, str | bytes]] = deque()  # (epoch, is_turn_audio, message)
        self.outbox_ready = asyncio.Event()
        self._queued_turns = 0
        self._on_overflow = on_overflow
        self._turns = TurnEvents(settings, self.send, self.conversation, self._on_transcript)
        self.responses.on_open = self._turns.end_turn
        self.background: SessionBackground | None = None

    # --- event loop: lifetime and config ---
    def attach_background(self, background: SessionBackground) -> None:
        self.background = background
        background.instructions, background.client_tools = self.client_instructions, self.offered_tools
        background.on_function_call = self.responses.function_call

    def configure(
        self,
        *,
        instructions: str,
        sampling: SamplingParams,
        eagerness: str,
        turn_detection: dict | None,
        transcribe: bool,
        input_rate: int,
        output_rate: int,
        output_transport: str,
        tools: list[ToolSpec],
        tool_choice: str | dict,
        modality: str,
        max_output_tokens: int | None,
    ) -> bool:
        """Take a checked config at once; True when the prefix or sampling changed (the slot re-joins)."""
        restart = instructions != self.client_instructions or sampling != self.sampling
        self.client_instructions, self.sampling = instructions, sampling
        self.eagerness, self.transcribe = eagerness, transcribe
        self.turn_detection = turn_detection
        self._turns.vad = turn_detection is not None
        self.responses.push_to_talk = (turn_detection is None
                                       or not turn_detection.get("create_response", True))
        self.responses.modality = "text" if modality == "text" else "audio"
        self.responses.max_output_tokens = max_output_tokens
        self.tool_choice = tool_choice
        self.input_rate = input_rate
        if output_rate != self.output_rate:
            self.output_rate = output_rate
            self._out_resampler = StreamResampler(SAMPLE_RATE, output_rate)
        self.output_transport = output_transport
        self.tools = tools
        if self.background is not None:
            self.background.instructions, self.background.client_tools = instructions, self.offered_tools
        return restart

    @property
    def instructions(self) -> str:
        """What the engine's pinned prefix holds (the tick loop joins with it): the client's instructions,
        then on a resumed session the tail of its restored record."""
        if not self.restored_context:
            return self.client_instructions
        return f"{self.client_instructions}\n{self.restored_context}" if self.client_instructions \
            else self.restored_context

    def detach(self) -> None:
        """Parked: the socket is gone, so nothing queued or produced from now on is kept."""
        self.detached = True
        self.outbox.clear()
        self._queued_turns = 0
        self.outbox_ready.clear()

    def rebind(self, on_overflow: Callable[[], None], on_fatal: Callable[[ErrorCode, str], None]) -> None:
        """A parked session taken over by a new connection: its closes go to that one now."""
        self._on_overflow, self._on_fatal = on_overflow, on_fatal
        self.detached = False

    @property
    def offered_tools(self) -> list[ToolSpec]:
        """The declared tools the background model may choose, by tool_choice."""
        if self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, dict):
            return [t for t in self.tools if t.name == self.tool_choice.get("name")]
        return list(self.tools)

    def close(self) -> None:
        """The connection is gone: no more output, and the session's background tasks are cancelled."""
        self.closed = True
        if self.background is not None:
            self.background.close()

    def fail(self, reason: str, code: ErrorCode = ErrorCode.INTERNAL_ERROR) -> None:
        """A tick stage raised for this session (a bug), or the engine under it was lost: it takes no more
        micro-turns and is closed, so nothing it queued can fail again next tick and no other session is
        held up."""
        self.failed = True
        if self._on_fatal is not None:
            message = f"internal error: {reason}" if code is ErrorCode.INTERNAL_ERROR else reason
            self._on_fatal(code, message)

    # --- event loop: input ---
    def append_audio(self, pcm: bytes, rate: int, event_id: str | None = None) -> None:
        """PCM16 input at `rate`; refused (ProtocolError) when malformed or too far ahead of real time."""
        self._audio_in.append(pcm16_to_float(pcm, event_id), rate, event_id)

    def commit_audio(self) -> None:
        """The client says its stream paused: the buffered tail goes in without waiting for jitter, and the
        speech so far becomes a user item (push to talk; with turn detection, an item still being spoken)."""
        self._audio_in.commit()
        self._turns.commit(self.seq)

    def clear_audio(self) -> None:
        self._audio_in.clear()
        self.send(ev.InputAudioBufferCleared())

    def set_image(self, rgb: np.ndarray) -> None:
        with self._image_lock:
            self._image = rgb

    def queue_text(self, text: str, event_id: str | None = None, item_id: str | None = None) -> None:
        """User text for the model's text-in slots (and the background's record, under `item_id`)."""
        tokens = [self._tokenizer.special.SRC_USER, *self._tokenizer.encode(text)]
        if len(self._text) + len(tokens) > self.settings.max_text_queue_tokens:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, "text-in queue is full; try again later", event_id)
        self._text.extend(tokens)
        if self.background is not None:
            self.background.on_user_text(text, item_id)

    def script_text_out(self, tokens: list[int]) -> None:
        """Force the model's next text-out tokens (through the real model path): demos and tests."""
        self._scripted.extend(tokens)

    def queue_background_text(self, text: str, epoch: int) -> None:
        """A background result for the text-in slots; dropped at take time if `epoch` is stale."""
        tokens = [self._tokenizer.special.SRC_BACKGROUND, *self._tokenizer.encode(text)]
        self._background.extend((epoch, t) for t in tokens)

    @property
    def background_queued(self) -> int:
        """Background tokens waiting for text-in slots."""
        return len(self._background)

    # --- tick thread ---
    def take_input(self, now: float) -> tuple[SlotInput, bool]:
        """This tick's SlotInput and whether its audio underran."""
        audio, underrun = self._audio_in.take(now)
        with self._image_lock:
            image, self._image = self._image, None
        text, background = self._take_text()
        if self.responses.stop_requested:  # an utterance is cut off: end its text span, as in training
            self.responses.stop_requested = False
            forced = [self._tokenizer.special.EPAD]
        else:
            forced = [self._scripted.popleft() for _ in range(min(self._text_out_slots, len(self._scripted)))]
        bias = EAGERNESS_WAIT_BIAS[self.eagerness] + self.responses.wait_bias_offset(bool(self._text))
        bias = min(max(bias, -MAX_WAIT_BIAS_OFFSET), MAX_WAIT_BIAS_OFFSET)  # the engine refuses more
        inp = SlotInput(
            audio=audio, image=image, text_in=text, text_in_background=background, force_text_out=forced,
            wait_bias_offset=bias, audio_out=self.responses.modality == "audio",
        )
        return inp, underrun

    def skip_input(self, turns: int) -> None:
        """The engine skipped `turns` ticks: their input audio is dropped so latency does not grow."""
        self._audio_in.skip(turns)

    @property
    def input_buffered_ms(self) -> int:
        return self._audio_in.buffered_ms

    def _take_text(self) -> tuple[list[int], bool]:
        # deque popleft/append are atomic; the loop only appends, this thread only pops
        n = self._text_in_slots
        if self._text:
            return [self._text.popleft() for _ in range(min(n, len(self._text)))], False
        taken: list[int] = []
        while self._background and len(taken) < n:
            epoch, token = self._background.popleft()
            if epoch == self.epoch:
                taken.append(token)
        return taken, bool(taken)

    # --- event loop: output ---
    def send(self, event: ev.ServerEvent) -> None:
        self._push(ev.dump_event(event, self.beta), turn=False)

    def send_task_event(self, event: ev.ServerEvent) -> None:
        """A task.* event, for a client that takes them (`task_events`)."""
        if self.task_events:
            self.send(event)

    def deliver(self, out: SlotOutput, inp: SlotInput) -> None:
        """One micro-turn of output (called once per tick on the event loop) and the input it answered."""
        if self.closed or self.failed:
            return
        if self._turns.voice_activity(self.seq, inp.audio, out.audio) and self.interrupts:
            self.barge_in()
        if self.transcribe:
            self._turns.transcribe(self.seq, out.heard_tokens)
        if self.debug and inp.text_in:
            self.send(ev.DebugTextIn(
                seq=self.seq, source="background" if inp.text_in_background else "user",
                tokens=inp.text_in, text=self._tokenizer.decode(inp.text_in),
            ))
        if out.error:
            self.send(ev.ErrorEvent(error=error_payload(ErrorCode.ENGINE_ERROR, out.error)))
        seq, pts = self.seq, self.seq * TURN_MS
        self.seq += 1
        json_audio = self.output_transport != "binary"
        item_id = self.responses.on_turn(
            seq, out.text, sum(t < self._tokenizer.n_bytes for t in out.text_tokens),
            self._tokenizer.special.EPAD in out.text_tokens, self._turns.model_speaking, len(inp.text_in),
            (lambda: self._encode_audio(out.audio)) if json_audio else None,
        )
        if not json_audio:
            self._push(output_frame(seq, pts, out.audio), turn=True)
        if self.background is not None:
            room = BACKGROUND_QUEUE_TURNS * self._text_in_slots - self.background_queued
            for text in self.background.on_model_turn(out, self._turns.model_speaking, room, item_id):
                self.queue_background_text(text, self.epoch)

    def _encode_audio(self, audio: np.ndarray) -> str:
        return base64.b64encode(float_to_pcm16(self._out_resampler.process(audio))).decode("ascii")

    def _push(self, message: str | bytes, turn: bool) -> None:
        if self.detached:
            return  # no socket to read it: dropped, so a parked session holds no growing queue
        self.outbox.append((self.epoch, turn, message))
        self._queued_turns += turn
        self.outbox_ready.set()
        if self._queued_turns > self.settings.max_output_queue_turns:
            self._on_overflow()

    def pop_message(self) -> str | bytes | None:
        """Next message for the sender, skipping audio from a stale epoch."""
        while self.outbox:
            epoch, turn, message = self.outbox.popleft()
            self._queued_turns -= turn
            if not turn or epoch == self.epoch:
                return message
        self.outbox_ready.clear()
        return None

    @property
    def queued_turns(self) -> int:
        return self._queued_turns

    @property
    def interrupts(self) -> bool:
        """User speech cuts the model off (barge-in on, and turn_detection.interrupt_response not false)."""
        td = self.turn_detection
        return td is not None and td.get("interrupt_response", True) is not False

    def barge_in(self, reason: str = "turn_detected") -> None:
        """Cut the model off: its queued output is dropped, the active response ends cancelled, and the
        client is told to flush its playback (user speech: "turn_detected"; response.cancel or
        output_audio_buffer.clear: "client_cancelled")."""
        self.epoch += 1
        if self.background is not None:
            self.background.barge_in(self.epoch)
        cancelled = self.responses.cancel(reason)
        if cancelled is not None:
            self.send(ev.OutputAudioBufferCleared(response_id=cancelled))

    def truncate(self, item_id: str, content_index: int, audio_end_ms: int, event_id: str | None) -> None:
        """conversation.item.truncate: the client played `audio_end_ms` of an assistant item; an item still
        being spoken is cut off first."""
        active = self.responses.active
        if active is not None and active.item_id == item_id:
            self.barge_in("client_cancelled")
        kept = self.responses.truncate(item_id, content_index, audio_end_ms, event_id)
        if self.background is not None:
            self.background.record.set_item_text(item_id, kept)

    def delete_item(self, item_id: str, event_id: str | None) -> None:
        self.conversation.delete(item_id, event_id)
        if self.background is not None:
            self.background.record.delete_item(item_id)
        self.send(ev.ConversationItemDeleted(item_id=item_id))

    def _on_transcript(self, item_id: str, transcript: str) -> None:
        if self.background is not None:
            self.background.record.add_user_text(transcript, source="transcript", item_id=item_id)

    def _on_item_text(self, item_id: str, text: str) -> None:
        if self.background is not None:
            self.background.record.set_item_text(item_id, text)

    def session_dict(self) -> dict:
        """This session as the OpenAI session object: what is in force."""
        modality = self.responses.modality
        max_tokens = self.responses.max_output_tokens
        session = ev.session_dict(
            self.id, self.client_instructions, self.input_rate, self.transcribe, self.turn_detection,
            self.output_rate,
            self.output_transport, self.sampling.seed, [modality],
            [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}
             for t in self.tools],
            self.tool_choice, max_tokens if max_tokens is not None else "inf",
        )
        session["replica"] = self.settings.replica  # microturn: which replica serves it
        return session


def output_frame(seq: int, pts_ms: int, audio: np.ndarray) -> bytes:
    """One micro-turn of output audio as a binary 0x81 frame (16 kHz PCM16)."""
    return p.encode_frame(p.KIND_OUTPUT_PCM16, seq, pts_ms, float_to_pcm16(audio))
