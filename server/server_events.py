"""Server events: pydantic models of every event the server sends, and the objects they carry.

Names and fields follow the OpenAI Realtime GA server events, so the `openai` package's
own models validate them (tests/test_openai_validation.py checks every type); microturn
adds a few fields (`seq`, `pts_ms` on deltas, `replica` on the session) and its own events
(`task.*`, `session.go_away`, `session.resumption_update`, `debug.text_in`). A connection that
asked for the beta protocol gets the beta spelling of a type (`BETA_NAMES`). `session_dict`,
`response_dict` and the item builders make the session, response and conversation-item
objects. This module knows nothing about sessions, clocks or the engine.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol import new_id

MODEL_ID = "microturn"  # the model name sessions report and GET /v1/models lists
MODEL_VOICE = "microturn"  # the one voice the demo model speaks with (session.audio.output.voice)


class ServerEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: new_id("event"))
    type: str


# --- session ---
class SessionCreated(ServerEvent):
    # extra: microturn's `resumption` {handle, expires_at, replica}, for a resumable session only
    model_config = ConfigDict(extra="allow")
    type: str = "session.created"
    session: dict


class SessionUpdated(ServerEvent):
    type: str = "session.updated"
    session: dict


# --- responses ---
class ResponseCreated(ServerEvent):
    type: str = "response.created"
    response: dict


class ResponseDone(ServerEvent):
    type: str = "response.done"
    response: dict


class ResponseOutputItemAdded(ServerEvent):
    type: str = "response.output_item.added"
    response_id: str
    output_index: int = 0
    item: dict


class ResponseOutputItemDone(ServerEvent):
    type: str = "response.output_item.done"
    response_id: str
    output_index: int = 0
    item: dict


class _ResponsePart(ServerEvent):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class ResponseContentPartAdded(_ResponsePart):
    type: str = "response.content_part.added"
    part: dict


class ResponseContentPartDone(_ResponsePart):
    type: str = "response.content_part.done"
    part: dict


class OutputAudioDelta(_ResponsePart):
    type: str = "response.output_audio.delta"
    delta: str  # base64 PCM16 LE mono at the session's output rate
    seq: int  # microturn: micro-turn number in this session (0-based)
    pts_ms: int  # microturn: session time of this audio's first sample


class OutputAudioDone(_ResponsePart):
    type: str = "response.output_audio.done"


class OutputTextDelta(_ResponsePart):
    type: str = "response.output_text.delta"
    delta: str
    seq: int


class OutputTextDone(_ResponsePart):
    type: str = "response.output_text.done"
    text: str


class OutputAudioTranscriptDelta(_ResponsePart):
    type: str = "response.output_audio_transcript.delta"
    delta: str
    seq: int


class OutputAudioTranscriptDone(_ResponsePart):
    type: str = "response.output_audio_transcript.done"
    transcript: str


class FunctionCallArgumentsDelta(ServerEvent):
    type: str = "response.function_call_arguments.delta"
    response_id: str
    item_id: str
    output_index: int = 0
    call_id: str
    delta: str


class FunctionCallArgumentsDone(ServerEvent):
    type: str = "response.function_call_arguments.done"
    response_id: str
    item_id: str
    output_index: int = 0
    call_id: str
    name: str
    arguments: str
    task_id: str | None = None  # microturn: the background task that made the call


class OutputAudioBufferCleared(ServerEvent):
    type: str = "output_audio_buffer.cleared"
    response_id: str


# WebRTC only, as OpenAI sends them: the call's outgoing audio began to carry a response's voice, and
# all of it has gone out (a barge-in sends `cleared` instead)
class OutputAudioBufferStarted(ServerEvent):
    type: str = "output_audio_buffer.started"
    response_id: str


class OutputAudioBufferStopped(ServerEvent):
    type: str = "output_audio_buffer.stopped"
    response_id: str


# --- conversation ---
class ConversationItemAdded(ServerEvent):
    type: str = "conversation.item.added"
    item: dict
    previous_item_id: str | None = None


class ConversationItemDone(ServerEvent):
    type: str = "conversation.item.done"
    item: dict
    previous_item_id: str | None = None


class ConversationItemTruncated(ServerEvent):
    type: str = "conversation.item.truncated"
    item_id: str
    content_index: int = 0
    audio_end_ms: int


class ConversationItemDeleted(ServerEvent):
    type: str = "conversation.item.deleted"
    item_id: str


class ConversationItemRetrieved(ServerEvent):
    type: str = "conversation.item.retrieved"
    item: dict


class InputAudioTranscriptionDelta(ServerEvent):
    type: str = "conversation.item.input_audio_transcription.delta"
    item_id: str  # the user speech item (input_audio_buffer.speech_started)
    content_index: int = 0
    delta: str
    seq: int  # microturn: the micro-turn whose audio-in gave this text


class InputAudioTranscriptionCompleted(ServerEvent):
    type: str = "conversation.item.input_audio_transcription.completed"
    item_id: str
    content_index: int = 0
    transcript: str
    usage: dict  # {"type": "duration", "seconds": ...}: the speech the transcript covers


# --- input audio buffer ---
class InputAudioBufferCommitted(ServerEvent):
    type: str = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class InputAudioBufferCleared(ServerEvent):
    type: str = "input_audio_buffer.cleared"


class InputAudioBufferSpeechStarted(ServerEvent):
    type: str = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class InputAudioBufferSpeechStopped(ServerEvent):
    type: str = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


# --- errors, lifetime, microturn's own ---
class ErrorEvent(ServerEvent):
    type: str = "error"
    error: dict  # errors.error_payload(...)


class SessionGoAway(ServerEvent):
    type: str = "session.go_away"
    time_left_ms: int  # how long the session may go on before the server closes it


class SessionResumptionUpdate(ServerEvent):
    """microturn: a fresh resumption handle (server/resumption.py), to a resumable session only.

    Its `type` has no default: like `TaskServerEvent`'s it is given at construction, which keeps it out
    of the OpenAI event types tests/test_openai_validation.py requires a recording of."""

    type: Literal["session.resumption_update"]
    handle: str  # reconnect with ?resume_handle=<handle>; the newest one received is the one to use
    expires_at: int  # Unix time
    replica: str  # the replica that sealed it
    reason: Literal["created", "turn", "refresh", "go_away"]


RESUMPTION_UPDATE = "session.resumption_update"


class DebugTextIn(ServerEvent):
    """What entered the model's text-in slots this micro-turn (debug_events or ?debug=1 only)."""

    type: str = "debug.text_in"
    seq: int  # the output micro-turn that answered this input
    source: Literal["user", "background"]
    tokens: list[int]
    text: str


class TaskServerEvent(ServerEvent):
    """task.created / task.delta / task.done / task.error / task.cancelled (server/background fills these)."""

    model_config = ConfigDict(extra="allow")
    task_id: str


BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "conversation.item.added": "conversation.item.created",
}


def dump_event(event: ServerEvent, beta: bool = False) -> str:
    data = event.model_dump(mode="json")
    if beta:
        data["type"] = BETA_NAMES.get(data["type"], data["type"])
    return json.dumps(data, separators=(",", ":"))


# --- objects events carry ---
def response_dict(
    response_id: str,
    status: str,
    *,
    modalities: list[str],
    output: list[dict] | None = None,
    metadata: dict[str, str] | None = None,
    usage: dict | None = None,
    status_details: dict | None = None,
    output_rate: int = 24_000,
    max_output_tokens: int | str = "inf",
) -> dict:
    """The OpenAI response object of `response.created` / `response.done`."""
    audio = {"output": {"format": {"type": "audio/pcm", "rate": output_rate}, "voice": MODEL_VOICE}}
    return {
        "id": response_id,
        "object": "realtime.response",
        "status": status,
        "status_details": status_details,
        "conversation_id": None,
        "output_modalities": modalities,
        "max_output_tokens": max_output_tokens,
        "audio": audio if "audio" in modalities else None,
        "metadata": metadata,
        "output": output or [],
        "usage": usage,
    }


def assistant_item(item_id: str, status: str, modality: str, text: str) -> dict:
    """An assistant message item; `modality` "audio" carries a transcript, "text" a text part."""
    part = {"type": "output_audio", "transcript": text} if modality == "audio" else {"type": "output_text",
                                                                                     "text": text}
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": status, "content": [part] if status != "in_progress" else []}


def content_part(modality: str, text: str) -> dict:
    """The part of `response.content_part.added` / `.done`."""
    return {"type": "audio", "transcript": text} if modality == "audio" else {"type": "text", "text": text}


def user_audio_item(item_id: str, transcript: str | None, status: str = "completed") -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
            "content": [{"type": "input_audio", "transcript": transcript}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments}


def model_card(created: int, root: str) -> dict:
    """An OpenAI `model` object for GET /v1/models; `root` names the weights (preset or checkpoint)."""
    return {"id": MODEL_ID, "object": "model", "created": created, "owned_by": "microturn", "root": root}


def session_dict(
    session_id: str,
    instructions: str,
    input_rate: int,
    transcribe: bool,
    turn_detection: dict[str, Any] | None,
    output_rate: int,
    output_transport: str,
    seed: int,
    modalities: list[str],
    tools: list[dict],
    tool_choice: str | dict,
    max_output_tokens: int | str,
) -> dict:
    """The OpenAI session object of `session.created` / `session.updated`: what is in force."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": MODEL_ID,
        "instructions": instructions,
        "output_modalities": modalities,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": input_rate},
                "transcription": {"model": MODEL_ID} if transcribe else None,
                "turn_detection": turn_detection,
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": output_rate},
                "voice": MODEL_VOICE,
                "transport": output_transport,
            },
        },
        "tools": tools,
        "tool_choice": tool_choice,
        "max_output_tokens": max_output_tokens,
        "seed": seed,
    }
