"""Per-session state: input chunking against the tick clock, text queue, output encoding, epochs.

Two threads touch a `Session`: the event loop (client input, output delivery) and the
tick thread (`take_input`, once per tick). `AudioInput` holds the only shared state
and guards it with a lock; everything else is event-loop only.

Input audio arrives in packets of any size at 16 or 24 kHz, is resampled to 16 kHz
and sliced into 200 ms micro-turns. A stream starts once `jitter_ms` of audio beyond
a turn is buffered; a streaming session that runs short at a tick gets what it has
padded with silence and counts an underrun, then re-buffers. The audio of ticks the
engine skipped (overruns) is dropped so latency does not grow. Output is one micro-turn
per tick, queued (bounded) for the sender, tagged with the epoch so a barge-in drops
what is stale. This module knows nothing about sockets or the engine's internals.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..model.resample import StreamResampler
from ..model.slots import SAMPLE_RATE, TURN_SAMPLES, SamplingParams, SlotInput, SlotOutput
from ..model.tokenizer import ByteTokenizer, CtcStreamDecoder
from . import protocol as p
from .errors import ErrorCode, ProtocolError
from .settings import ServerSettings

TURN_MS = TURN_SAMPLES * 1000 // SAMPLE_RATE
SPEECH_HANGOVER_TURNS = 2  # silent input turns before user speech counts as ended
# turns without new transcript bytes, once speech has ended, before a transcript counts as complete:
# the model may name a word up to 400 ms after hearing it (training/heard.py HEARD_LAG_TOKENS)
TRANSCRIPT_SETTLE_TURNS = 3


def level_dbfs(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


def pcm16_to_float(data: bytes, event_id: str | None = None) -> np.ndarray:
    if len(data) % 2:
        raise ProtocolError(
            ErrorCode.INVALID_AUDIO, "PCM16 audio must have an even number of bytes", event_id
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class AudioInput:
    """Input audio buffer at 16 kHz with the jitter/underrun policy; thread-safe."""

    def __init__(self, jitter_ms: int, max_ahead_ms: int) -> None:
        self._lock = threading.Lock()
        self._buf = np.zeros(0, np.float32)
        self._jitter = jitter_ms * SAMPLE_RATE // 1000
        self._max_ahead = max_ahead_ms * SAMPLE_RATE // 1000
        self._jitter_s = jitter_ms / 1000.0
        self._resampler: StreamResampler | None = None
        self._primed = False
        self._flush = False
        self._last_arrival = -1e9
        self.underruns = 0
        self.dropped_samples = 0  # input of ticks the engine skipped (kept, it would add latency for good)

    def append(self, samples: np.ndarray, rate: int, event_id: str | None = None) -> None:
        """Add samples at `rate`; refuses audio beyond the real-time bound (nothing is buffered then)."""
        if rate not in p.PCM_RATES:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_SAMPLE_RATE, f"input rate {rate} not in {p.PCM_RATES}", event_id
            )
        incoming = len(samples) * SAMPLE_RATE // rate
        with self._lock:
            if len(self._buf) + incoming > self._max_ahead:
                raise ProtocolError(
                    ErrorCode.INPUT_RATE_EXCEEDED,
                    f"input audio over {self._max_ahead * 1000 // SAMPLE_RATE} ms ahead of real time",
                    event_id,
                )
            if self._resampler is None or self._resampler.sr_in != rate:
                self._resampler = StreamResampler(rate, SAMPLE_RATE)
            self._buf = np.concatenate([self._buf, self._resampler.process(samples)])
            self._last_arrival = time.monotonic()

    def skip(self, turns: int) -> None:
        """The clock moved on `turns` ticks without a step: their audio is dropped, not delayed."""
        with self._lock:
            drop = min(len(self._buf), turns * TURN_SAMPLES) if self._primed else 0
            self._buf = self._buf[drop:]
            self.dropped_samples += drop

    def commit(self) -> None:
        """The client says the stream paused: hand over the tail without waiting for jitter."""
        with self._lock:
            self._flush = True

    def clear(self) -> None:
        with self._lock:
            self._buf = np.zeros(0, np.float32)
            self._primed = False

    @property
    def buffered_ms(self) -> int:
        return len(self._buf) * 1000 // SAMPLE_RATE

    def take(self, now: float) -> tuple[np.ndarray, bool]:
        """One turn of input for the tick at `now`; returns (audio, underrun)."""
        with self._lock:
            n = len(self._buf)
            quiet = now - self._last_arrival >= self._jitter_s + TURN_MS / 1000.0
            if not self._primed and n and (n >= TURN_SAMPLES + self._jitter or quiet or self._flush):
                self._primed = True
            if not self._primed:
                return np.zeros(TURN_SAMPLES, np.float32), False
            if n >= TURN_SAMPLES:
                chunk, self._buf = self._buf[:TURN_SAMPLES], self._buf[TURN_SAMPLES:]
                return chunk, False
            chunk = np.zeros(TURN_SAMPLES, np.float32)
            chunk[:n] = self._buf
            self._buf = self._buf[:0]
            underrun = not (quiet or self._flush)
            self._primed = self._flush = False
            self.underruns += underrun
            return chunk, underrun


class TaskHooks(Protocol):
    """Where background work plugs in (server/tasks.py provides it); see `Session.tasks`."""

    async def create(self, session: Session, event: p.TaskCreate) -> None: ...

    async def cancel(self, session: Session, event: p.TaskCancel) -> None: ...

    async def close(self, session: Session) -> None: ...

    def set_instructions(self, instructions: str) -> None: ...

    def on_user_text(self, text: str) -> None: ...

    def on_barge_in(self, epoch: int) -> None: ...

    def on_turn(self, out: SlotOutput, model_speaking: bool) -> None: ...

    def function_call_output(self, call_id: str, output: str) -> bool: ...


class Session:
    def __init__(
        self,
        settings: ServerSettings,
        tokenizer: ByteTokenizer,
        text_in_slots: int,
        text_out_slots: int,
        on_overflow: Callable[[Session], None],
        beta: bool = False,
        hears: bool = False,
    ) -> None:
        self.id = p.new_id("sess")
        self.settings = settings
        self.beta = beta  # beta spellings of server events
        self.slot: int | None = None
        self.closed = False
        self.created_at = time.monotonic()
        # sampling and prefix: changing either re-joins the engine slot
        self.instructions = ""
        self.sampling = SamplingParams()
        self.eagerness = "auto"  # turn_detection.eagerness, as SamplingParams.wait_bias
        # input
        self.audio_in = AudioInput(settings.jitter_ms, settings.max_input_ahead_ms)
        self.input_rate = 24_000  # OpenAI's default for audio/pcm
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
        self.response_id = p.new_id("resp")
        self.item_id = p.new_id("item")
        self.outbox: deque[tuple[int, bool, str | bytes]] = deque()  # (epoch, is_turn_audio, message)
        self.outbox_ready = asyncio.Event()
        self._queued_turns = 0
        self._on_overflow = on_overflow
        # voice activity for barge-in
        self._user_speaking = False
        self._silent_turns = 0
        self._model_speaking = False
        self.tasks: TaskHooks | None = None
        self.tools: list = []  # declared tools (server/background ToolSpec), passed to background work
        self.debug = settings.debug_events  # send debug.text_in events
        # transcripts of the user's speech: the model's own reading of its audio-in, where it was trained
        # for that (Engine.hears); on by default there, and audio.input.transcription = null turns it off
        self.hears = hears
        self.transcribe = hears
        self._heard = CtcStreamDecoder()
        self._user_item: str | None = None  # the speech item of the latest onset
        self._transcript: list[str] = []
        self._transcript_item = ""
        self._heard_quiet = 0

    # --- event loop: input ---
    def queue_text(self, text: str, event_id: str | None = None) -> None:
        tokens = [self._tokenizer.special.SRC_USER, *self._tokenizer.encode(text)]
        if len(self._text) + len(tokens) > self.settings.max_text_queue_tokens:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, "text-in queue is full; try again later", event_id)
        self._text.extend(tokens)
        if self.tasks is not None:
            self.tasks.on_user_text(text)

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

    def set_image(self, rgb: np.ndarray) -> None:
        with self._image_lock:
            self._image = rgb

    def set_output_format(self, rate: int, transport: str | None) -> None:
        if rate != self.output_rate:
            self.output_rate = rate
            self._out_resampler = StreamResampler(SAMPLE_RATE, rate)
        if transport is not None:
            self.output_transport = transport

    # --- tick thread ---
    def take_input(self, now: float) -> tuple[SlotInput, bool]:
        """This tick's SlotInput and whether its audio underran."""
        audio, underrun = self.audio_in.take(now)
        with self._image_lock:
            image, self._image = self._image, None
        text, background = self._take_text()
        forced = [self._scripted.popleft() for _ in range(min(self._text_out_slots, len(self._scripted)))]
        inp = SlotInput(
            audio=audio, image=image, text_in=text, text_in_background=background, force_text_out=forced
        )
        return inp, underrun

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
    def send(self, event: p.ServerEvent) -> None:
        self._push(p.dump_event(event, self.beta), turn=False)

    def deliver(self, out: SlotOutput, inp: SlotInput) -> None:
        """One micro-turn of output (called once per tick on the event loop) and the input it answered."""
        if self.closed:
            return
        self._voice_activity(inp.audio, out.audio)
        self._transcribe(out.heard_tokens)
        if self.debug and inp.text_in:
            self.send(p.DebugTextIn(
                seq=self.seq, source="background" if inp.text_in_background else "user",
                tokens=inp.text_in, text=self._tokenizer.decode(inp.text_in),
            ))
        if self.tasks is not None:
            self.tasks.on_turn(out, self._model_speaking)
        if out.error:
            self.send(
                p.ErrorEvent(
                    error={
                        "type": "server_error",
                        "code": ErrorCode.ENGINE_ERROR.value,
                        "message": out.error,
                        "param": None,
                        "event_id": None,
                    }
                )
            )
        seq, pts = self.seq, self.seq * TURN_MS
        self.seq += 1
        part = {"response_id": self.response_id, "item_id": self.item_id}
        if self.output_transport == "binary":
            self._push(p.encode_frame(p.KIND_OUTPUT_PCM16, seq, pts, float_to_pcm16(out.audio)), turn=True)
        else:
            pcm = float_to_pcm16(self._out_resampler.process(out.audio))
            delta = base64.b64encode(pcm).decode("ascii")
            self._push(
                p.dump_event(p.OutputAudioDelta(delta=delta, seq=seq, pts_ms=pts, **part), self.beta), True
            )
        if out.text:
            self.send(p.OutputAudioTranscriptDelta(delta=out.text, seq=seq, **part))
            self.send(p.OutputTextDelta(delta=out.text, seq=seq, **part))

    def _push(self, message: str | bytes, turn: bool) -> None:
        self.outbox.append((self.epoch, turn, message))
        self._queued_turns += turn
        self.outbox_ready.set()
        if self._queued_turns > self.settings.max_output_queue_turns:
            self._on_overflow(self)

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

    def _voice_activity(self, input_audio: np.ndarray, output_audio: np.ndarray) -> None:
        speech = level_dbfs(input_audio) > self.settings.vad_threshold_dbfs
        self._silent_turns = 0 if speech else self._silent_turns + 1
        onset = speech and not self._user_speaking
        if speech:
            self._user_speaking = True
        elif self._silent_turns >= SPEECH_HANGOVER_TURNS:
            self._user_speaking = False
        if onset:
            self._complete_transcript()
            self._user_item = item = p.new_id("item")
            self.send(p.InputAudioBufferSpeechStarted(audio_start_ms=self.seq * TURN_MS, item_id=item))
            if self.settings.barge_in and self._model_speaking:
                self.barge_in()
        self._model_speaking = level_dbfs(output_audio) > self.settings.speaking_threshold_dbfs

    def _transcribe(self, heard_tokens: list[int]) -> None:
        """Stream what the model heard this turn as transcript deltas of the current speech item."""
        if not self.transcribe:
            return
        text = self._heard.feed(heard_tokens)
        if text:
            if not self._transcript:
                self._transcript_item = self._user_item or p.new_id("item")
            self._transcript.append(text)
            self._heard_quiet = 0
            self.send(p.InputAudioTranscriptionDelta(item_id=self._transcript_item, delta=text, seq=self.seq))
            return
        self._heard_quiet += 1
        if not self._user_speaking and self._heard_quiet >= TRANSCRIPT_SETTLE_TURNS:
            self._complete_transcript()

    def _complete_transcript(self) -> None:
        if self._transcript:
            transcript = "".join(self._transcript).strip()
            item = self._transcript_item
            self.send(p.InputAudioTranscriptionCompleted(item_id=item, transcript=transcript))
            self._transcript = []

    def barge_in(self) -> None:
        """Drop queued output of the current response and tell the client to flush its playback."""
        old = self.response_id
        self.epoch += 1
        if self.tasks is not None:
            self.tasks.on_barge_in(self.epoch)
        self.send(p.OutputAudioBufferCleared(response_id=old))
        self.send(p.ResponseDone(response=self.response_dict(old, "cancelled")))
        self.response_id, self.item_id = p.new_id("resp"), p.new_id("item")
        self.send(p.ResponseCreated(response=self.response_dict(self.response_id, "in_progress")))

    def response_dict(self, response_id: str, status: str) -> dict:
        return {
            "id": response_id,
            "object": "realtime.response",
            "status": status,
            "output_modalities": ["audio"],
            "output": [],
        }

    def session_dict(self) -> dict:
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": "microturn",
            "instructions": self.instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.input_rate},
                    "transcription": {"model": "microturn"} if self.transcribe else None,
                    "turn_detection": {"type": "semantic_vad", "eagerness": self.eagerness},
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": self.output_rate},
                    "transport": self.output_transport,
                },
            },
            "seed": self.sampling.seed,
        }
