"""The wire protocol, client side: pydantic models of every client event, and the binary frame codec.

JSON events follow the OpenAI Realtime GA names (`session.update`,
`input_audio_buffer.append`, `conversation.item.truncate`, `response.create`, ...) plus
microturn's `task.create` / `task.cancel`; beta `session.update` fields are accepted too.
Unknown fields are ignored (clients send many this server has no use for); every field
this server reads is typed and bounded here, before it reaches a tensor or a timer.
Binary media frames are `[kind u8][flags u8][seq u32 BE][pts_ms u32 BE][payload]`;
kind 0x82 is reserved (Opus-coded output) and not sent. Parsing raises `ProtocolError`
with the offending `event_id`. Server events live in server/server_events.py. This
module knows nothing about sessions, clocks or the engine.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import ErrorCode, ProtocolError

# --- binary frames ---
FRAME_HEADER = struct.Struct(">BBII")  # kind, flags, seq, pts_ms
KIND_INPUT_PCM16 = 0x01  # payload: PCM16 LE mono; rate from flags
KIND_INPUT_JPEG = 0x02  # payload: one JPEG image (the latest camera frame)
KIND_OUTPUT_PCM16 = 0x81  # payload: one micro-turn of PCM16 LE mono at 16 kHz
FLAG_RATE_24K = 0x01  # on KIND_INPUT_PCM16: samples are at 24 kHz (else 16 kHz)
INPUT_KINDS = (KIND_INPUT_PCM16, KIND_INPUT_JPEG)
PCM_RATE_16K = 16_000
PCM_RATE_24K = 24_000
PCM_RATES = (PCM_RATE_16K, PCM_RATE_24K)  # accepted input and output rates
DEFAULT_PCM_RATE = PCM_RATE_24K  # OpenAI's audio/pcm rate, and the beta "pcm16" format's
PTS_WRAP = 1 << 32
# numeric client fields are range-checked here, before they reach a tensor or a timer
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # the engine keeps each row's seed in an int64 tensor
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0  # OpenAI's sampling temperature range
MAX_TASK_TIMEOUT_S = 3600.0  # longest timeout a client may ask for one background task
MAX_OUTPUT_TOKENS = 4096  # OpenAI's ceiling on max_output_tokens ("inf" = no limit)
MAX_METADATA_KEYS = 16  # OpenAI's limits on a response's metadata
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512
MAX_AUDIO_END_MS = 1 << 31  # conversation.item.truncate's audio_end_ms (clamped to the audio sent)


@dataclass(frozen=True)
class Frame:
    kind: int  # one of the KIND_* constants
    flags: int  # kind-specific bits
    seq: int  # sender's frame counter (u32, wraps)
    pts_ms: int  # sender's presentation time in ms (u32, wraps)
    payload: bytes


def encode_frame(kind: int, seq: int, pts_ms: int, payload: bytes, flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(kind, flags, seq % PTS_WRAP, pts_ms % PTS_WRAP) + payload


def frame_event_id(seq: int) -> str:
    """How errors name a binary frame (frames carry no event_id): by its seq."""
    return f"frame:{seq}"


def decode_frame(data: bytes) -> Frame:
    """Parse a client binary frame; only input kinds are accepted."""
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"binary frame shorter than its {FRAME_HEADER.size}-byte header"
        )
    kind, flags, seq, pts_ms = FRAME_HEADER.unpack_from(data)
    if kind not in INPUT_KINDS:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"unknown binary frame kind 0x{kind:02x}", frame_event_id(seq)
        )
    if kind == KIND_INPUT_PCM16 and flags & ~FLAG_RATE_24K:
        message = f"unknown PCM16 frame flags 0x{flags:02x}"
        raise ProtocolError(ErrorCode.UNSUPPORTED_SAMPLE_RATE, message, frame_event_id(seq))
    return Frame(kind, flags, seq, pts_ms, data[FRAME_HEADER.size :])


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# --- client events ---
OutputTokens = Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)]  # the bound on the int arm only (not "inf")

class _Loose(BaseModel):
    """Client objects: unknown fields ignored (OpenAI clients send many we do not use)."""

    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Loose):
    type: str = "audio/pcm"  # only audio/pcm (PCM16 LE mono) is supported
    rate: int = DEFAULT_PCM_RATE  # one of PCM_RATES (checked against the set, so any int is safe here)


class TurnDetection(_Loose):
    """OpenAI's turn_detection; here the model itself takes turns, and `eagerness` biases it."""

    type: str | None = None  # "server_vad" / "semantic_vad": accepted, the model decides either way
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None  # False: the model speaks only after response.create
    interrupt_response: bool | None = None  # False: user speech does not cut the model off


class AudioInput(_Loose):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | bool | None = None  # null or false: push to talk
    # OpenAI's {"model", "language", "prompt"}: any object turns transcripts of the user's speech on,
    # null off; microturn's are the model's own reading of its audio-in (no second model, no fields used)
    transcription: dict | None = None


class AudioOutput(_Loose):
    format: AudioFormat | None = None
    voice: str | None = None  # only server_events.MODEL_VOICE: the model speaks with one voice
    transport: Literal["json", "binary"] | None = None  # microturn extension: audio as binary 0x81 frames


class AudioConfig(_Loose):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class SessionConfig(_Loose):
    type: str | None = None
    instructions: str | None = None
    audio: AudioConfig | None = None
    output_modalities: list[Literal["audio", "text"]] | None = None
    voice: str | None = None  # beta spelling of audio.output.voice
    tool_choice: str | dict | None = None  # "auto", "none", or {"type": "function", "name": ...}
    max_output_tokens: OutputTokens | Literal["inf"] | None = None
    max_response_output_tokens: OutputTokens | Literal["inf"] | None = None  # beta spelling
    # microturn extension: send microturn's task.* events to this session (also on with ?task_events=1, or
    # once the client sends task.create / task.cancel); OpenAI clients that validate events stay clean
    task_events: bool | None = None
    input_audio_format: str | None = None  # beta: "pcm16" = 24 kHz PCM16
    output_audio_format: str | None = None  # beta
    turn_detection: TurnDetection | bool | None = None  # beta spelling of audio.input.turn_detection
    # beta; both streams' sampling temperature (NaN and infinities are refused, not clamped)
    temperature: float | None = Field(None, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX, allow_inf_nan=False)
    # microturn extension: sampling seed (same seed + inputs = same output)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    tools: list[dict] | None = None  # function tools; `"behavior": "background"` makes one a background task


class _ClientEvent(_Loose):
    event_id: str | None = None


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str  # base64 PCM16 LE mono at the session's input rate


class InputAudioBufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class InputText(_Loose):
    type: Literal["input_text", "text", "output_text"]
    text: str


class InputImage(_Loose):
    type: Literal["input_image"]
    image_url: str  # data:image/jpeg;base64,... (the latest camera frame)


class InputAudio(_Loose):
    type: Literal["input_audio"]
    audio: str  # base64 PCM16 at the session's input rate


ContentPart = Annotated[InputText | InputImage | InputAudio, Field(discriminator="type")]


class Item(_Loose):
    id: str | None = None  # the client's id for it (kept); else the server picks one
    type: Literal["message"] = "message"
    # user text goes to the model; system and assistant messages join the conversation record only
    role: Literal["user", "system", "assistant"] = "user"
    content: list[ContentPart]


class FunctionCallOutputItem(_Loose):
    """The client's answer to `response.function_call_arguments.done` (a client-declared tool ran)."""

    id: str | None = None
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ConversationItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None  # place it after this item ("root": first)
    item: Item | FunctionCallOutputItem


class ConversationItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(0, ge=0, le=1 << 16)
    audio_end_ms: int = Field(ge=0, le=MAX_AUDIO_END_MS)


class ConversationItemDelete(_ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ConversationItemRetrieve(_ClientEvent):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ResponseParams(_Loose):
    """What response.create may ask of the one response; fields it cannot honour are refused."""

    instructions: str | None = None  # read by the model as text-in before it answers
    metadata: dict[str, str] | None = None  # echoed on response.created / response.done
    output_modalities: list[Literal["audio", "text"]] | None = None  # must match the session's
    conversation: str | None = None  # "auto" only
    input: list | None = None  # out-of-band input: refused
    tools: list | None = None  # per-response tools: refused (set them with session.update)
    tool_choice: str | dict | None = None  # per-response tool choice: refused
    max_output_tokens: OutputTokens | Literal["inf"] | None = None


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioBufferClear(_ClientEvent):
    type: Literal["output_audio_buffer.clear"]


class TaskRequest(_Loose):
    input: str
    scheduling: Literal["interrupt", "when_idle", "silent"] = "when_idle"
    tool: str | None = None
    timeout_s: float | None = Field(None, gt=0, le=MAX_TASK_TIMEOUT_S, allow_inf_nan=False)


class TaskCreate(_ClientEvent):
    type: Literal["task.create"]
    task: TaskRequest


class TaskCancel(_ClientEvent):
    type: Literal["task.cancel"]
    task_id: str


CLIENT_EVENTS = (
    SessionUpdate,
    InputAudioBufferAppend,
    InputAudioBufferCommit,
    InputAudioBufferClear,
    ConversationItemCreate,
    ConversationItemTruncate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ResponseCreate,
    ResponseCancel,
    OutputAudioBufferClear,
    TaskCreate,
    TaskCancel,
)
ClientEvent = Annotated[Union[CLIENT_EVENTS], Field(discriminator="type")]  # noqa: UP007
_CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = frozenset(get_args(model.model_fields["type"].annotation)[0] for model in CLIENT_EVENTS)


def parse_client_event(text: str | bytes) -> BaseModel:
    """Parse one JSON text frame into its event model; ProtocolError names the event_id."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_JSON, "an event must be a JSON object")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "missing string field 'type'", event_id, "type")
    if kind not in CLIENT_EVENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event type {kind!r}", event_id, "type")
    if (bad := unencodable_text(data)) is not None:
        event_id = None if event_id is not None and not _encodable(event_id) else event_id
        raise ProtocolError(ErrorCode.INVALID_EVENT, f"{bad}: text is not valid Unicode (lone surrogate)",
                            event_id, bad)
    try:
        return _CLIENT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        raise ProtocolError(ErrorCode.INVALID_EVENT, f"{param}: {first['msg']}", event_id, param) from None


def _encodable(text: str) -> bool:
    # isascii is a fast scan without a copy: audio base64 and most text never pay for the encode
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unencodable_text(data: Any) -> str | None:
    """The path of the first string (key or value) that UTF-8 cannot encode, or None.

    JSON's `\\ud800` escapes decode to lone surrogates, which are valid Python str but fail
    every later encode (tokenizer, JSON dump, socket). One walk over the parsed JSON covers
    every field, including the untyped ones (`tools`, `transcription`) a field validator
    would miss. Iterative, so a deep document cannot overflow the stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return path or "event"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return path or "event"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))
    return None


def check_metadata(metadata: dict[str, str] | None, event_id: str | None) -> None:
    """OpenAI's bounds on a response's metadata: 16 pairs, keys to 64 and values to 512 characters."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS or any(
        len(k) > MAX_METADATA_KEY_CHARS or len(v) > MAX_METADATA_VALUE_CHARS for k, v in metadata.items()
    ):
        message = (f"metadata: at most {MAX_METADATA_KEYS} pairs, keys to {MAX_METADATA_KEY_CHARS} and "
                   f"values to {MAX_METADATA_VALUE_CHARS} characters")
        raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "response.metadata")
