"""A client's session config (`session.update`, or the one a client secret carries) mapped onto a session.

`apply_session_config(session, cfg, event_id)` is all-or-nothing: it checks every field
against what the session has now and raises `ProtocolError` (naming the field) before
anything changes, then hands the new values to `Session.configure` at once. It returns
True when the instructions or the sampling changed, which restarts the engine slot's
conversation; the caller re-joins the slot. Both spellings map here: GA
(`audio.input.format`, `audio.input.turn_detection`) and beta (`input_audio_format:
"pcm16"`, top-level `turn_detection`, `temperature`). Every field is honoured or refused:
`turn_detection` null/false is push to talk, its `eagerness` a per-tick wait bias (no
re-join), `create_response: false` holds the model until `response.create`,
`interrupt_response: false` turns barge-in off; `output_modalities: ["text"]` stops audio
(and the row's vocoder work); `voice` must be the model's one voice; `tool_choice`
"auto"/"none"/one named function; `max_output_tokens` per response. Tools are OpenAI
function tools, and `"behavior": "background"` makes the model's call of one a background
task. This module knows nothing about sockets, the tick thread or how background tasks run.
"""

from __future__ import annotations

from dataclasses import replace

from . import protocol as p
from . import server_events as ev
from .background import ToolSpec
from .errors import ErrorCode, ProtocolError
from .session import Session

BETA_PCM_FORMAT = "pcm16"  # the beta protocol's one audio format: PCM16 at DEFAULT_PCM_RATE


def apply_session_config(session: Session, cfg: p.SessionConfig, event_id: str | None) -> bool:
    """Apply `cfg` to `session` or raise without changing it; True when the engine slot must re-join."""
    audio_in = cfg.audio.input if cfg.audio else None
    out = cfg.audio.output if cfg.audio else None
    in_rate = format_rate(audio_in.format if audio_in else None, cfg.input_audio_format, event_id,
                          "audio.input.format")
    out_rate = format_rate(out.format if out else None, cfg.output_audio_format, event_id,
                           "audio.output.format")
    voice = (out.voice if out else None) or cfg.voice
    if voice is not None and voice != ev.MODEL_VOICE:
        message = f"voice {voice!r}: this model speaks with one voice, {ev.MODEL_VOICE!r}"
        raise ProtocolError(ErrorCode.UNSUPPORTED, message, event_id, "audio.output.voice")
    sampling = session.sampling
    if cfg.temperature is not None:
        sampling = replace(sampling, text_temperature=cfg.temperature, audio_temperature=cfg.temperature)
    if cfg.seed is not None:
        sampling = replace(sampling, seed=cfg.seed)
    turn_detection, eagerness = _turn_detection(session, cfg, audio_in)
    transcribe = session.transcribe
    if audio_in is not None and "transcription" in audio_in.model_fields_set:
        transcribe = audio_in.transcription is not None
        if transcribe and not session.hears:
            message = "this checkpoint was not trained to transcribe its input (train --heard-weight)"
            raise ProtocolError(ErrorCode.UNSUPPORTED, message, event_id, "audio.input.transcription")
    tools = session.tools if cfg.tools is None else [tool_spec(t, event_id) for t in cfg.tools]
    tool_choice = session.tool_choice if cfg.tool_choice is None else _tool_choice(cfg.tool_choice, tools,
                                                                                   event_id)
    modality = session.responses.modality if cfg.output_modalities is None else output_modality(
        cfg.output_modalities, event_id, "output_modalities")
    limit = cfg.max_output_tokens if cfg.max_output_tokens is not None else cfg.max_response_output_tokens
    max_tokens = session.responses.max_output_tokens if limit is None else (None if limit == "inf" else limit)
    return session.configure(
        instructions=cfg.instructions if cfg.instructions is not None else session.instructions,
        sampling=sampling,
        eagerness=eagerness,
        turn_detection=turn_detection,
        transcribe=transcribe,
        input_rate=in_rate or session.input_rate,
        output_rate=out_rate or session.output_rate,
        output_transport=(out.transport if out else None) or session.output_transport,
        tools=tools,
        tool_choice=tool_choice,
        modality=modality,
        max_output_tokens=max_tokens,
    )


def _turn_detection(session: Session, cfg: p.SessionConfig, audio_in: p.AudioInput | None
                    ) -> tuple[dict | None, str]:
    """(turn_detection in force, eagerness): null or false turns it off (push to talk), absent keeps it."""
    if audio_in is not None and "turn_detection" in audio_in.model_fields_set:
        given = audio_in.turn_detection
    elif "turn_detection" in cfg.model_fields_set:
        given = cfg.turn_detection
    else:
        return session.turn_detection, session.eagerness
    if given is None or given is False:
        return None, session.eagerness
    if given is True:
        given = p.TurnDetection()
    before = session.turn_detection or {}
    eagerness = given.eagerness or before.get("eagerness") or session.eagerness
    return {
        "type": given.type or before.get("type") or "semantic_vad",
        "eagerness": eagerness,
        "create_response": given.create_response if given.create_response is not None
        else before.get("create_response", True),
        "interrupt_response": given.interrupt_response if given.interrupt_response is not None
        else before.get("interrupt_response", True),
    }, eagerness


def _tool_choice(choice: str | dict, tools: list[ToolSpec], event_id: str | None) -> str | dict:
    """'auto' and 'none', or one declared function; 'required' cannot be honoured (the interaction model
    decides whether to delegate at all)."""
    if choice in ("auto", "none"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if any(t.name == choice.get("name") for t in tools):
            return {"type": "function", "name": choice["name"]}
        message = f"tool_choice names {choice.get('name')!r}, which is not a declared tool"
        raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "tool_choice")
    message = "tool_choice: 'auto', 'none' or {'type': 'function', 'name': ...}; 'required' is not supported"
    raise ProtocolError(ErrorCode.UNSUPPORTED, message, event_id, "tool_choice")


def output_modality(modalities: list[str], event_id: str | None, param: str) -> str:
    """["audio"] (speech with its transcript; also ["audio", "text"]) or ["text"] (no audio at all)."""
    if not modalities:
        raise ProtocolError(ErrorCode.INVALID_EVENT, "output_modalities: at least one", event_id, param)
    return "audio" if "audio" in modalities else "text"


def tool_spec(tool: dict, event_id: str | None) -> ToolSpec:
    """An OpenAI-style function tool; `"behavior": "background"` makes the model's call a background task."""
    try:
        return ToolSpec(
            name=tool["name"], description=tool.get("description", ""),
            parameters=tool.get("parameters") or {"type": "object", "properties": {}},
            background=tool.get("behavior") == "background" or bool(tool.get("background")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        message = f"bad tool declaration: {exc}"
        raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "session.tools") from exc


def format_rate(fmt: p.AudioFormat | None, beta: str | None, event_id: str | None, param: str) -> int | None:
    """The sample rate a (GA or beta) audio format asks for; None = unchanged."""
    if beta is not None:
        if beta != BETA_PCM_FORMAT:
            message = f"audio format {beta!r}: only {BETA_PCM_FORMAT}"
            raise ProtocolError(ErrorCode.UNSUPPORTED, message, event_id, param)
        return p.DEFAULT_PCM_RATE
    if fmt is None:
        return None
    if fmt.type != "audio/pcm":
        message = f"audio format {fmt.type!r}: only audio/pcm"
        raise ProtocolError(ErrorCode.UNSUPPORTED, message, event_id, param)
    if fmt.rate not in p.PCM_RATES:
        message = f"rate {fmt.rate} not in {p.PCM_RATES}"
        raise ProtocolError(ErrorCode.UNSUPPORTED_SAMPLE_RATE, message, event_id, param)
    return fmt.rate
