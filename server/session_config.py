"""A client's session config (`session.update`, or the one a client secret carries) mapped onto a session.

`apply_session_config(session, cfg, event_id)` is all-or-nothing: it checks every field
against what the session has now and raises `ProtocolError` (naming the field) before
anything changes, then hands the new values to `Session.configure` at once. It returns
True when the instructions or the sampling changed, which restarts the engine slot's
conversation; the caller re-joins the slot. Both spellings map here: GA
(`audio.input.format`, `audio.input.turn_detection`) and beta (`input_audio_format:
"pcm16"`, top-level `turn_detection`, `temperature`). `turn_detection.eagerness` becomes
`SamplingParams.wait_bias`; tools are OpenAI function tools, and `"behavior": "background"`
makes the model's call of one a background task. This module knows nothing about
sockets, the tick thread or how background tasks run.
"""

from __future__ import annotations

from dataclasses import replace

from . import protocol as p
from .background import ToolSpec
from .errors import ErrorCode, ProtocolError
from .session import Session

# turn_detection.eagerness -> SamplingParams.wait_bias (nats over the checkpoint's own calibrated bias):
# low waits longer before taking the turn, high takes it sooner
EAGERNESS_WAIT_BIAS = {"low": 2.0, "medium": 0.0, "high": -2.0, "auto": 0.0}
BETA_PCM_FORMAT = "pcm16"  # the beta protocol's one audio format: PCM16 at DEFAULT_PCM_RATE


def apply_session_config(session: Session, cfg: p.SessionConfig, event_id: str | None) -> bool:
    """Apply `cfg` to `session` or raise without changing it; True when the engine slot must re-join."""
    audio_in = cfg.audio.input if cfg.audio else None
    out = cfg.audio.output if cfg.audio else None
    in_rate = format_rate(audio_in.format if audio_in else None, cfg.input_audio_format, event_id,
                          "audio.input.format")
    out_rate = format_rate(out.format if out else None, cfg.output_audio_format, event_id,
                           "audio.output.format")
    sampling = session.sampling
    if cfg.temperature is not None:
        sampling = replace(sampling, text_temperature=cfg.temperature, audio_temperature=cfg.temperature)
    if cfg.seed is not None:
        sampling = replace(sampling, seed=cfg.seed)
    turns = (audio_in.turn_detection if audio_in else None) or cfg.turn_detection
    eagerness = turns.eagerness if turns is not None and turns.eagerness else session.eagerness
    sampling = replace(sampling, wait_bias=EAGERNESS_WAIT_BIAS[eagerness])
    transcribe = session.transcribe
    if audio_in is not None and "transcription" in audio_in.model_fields_set:
        transcribe = audio_in.transcription is not None
        if transcribe and not session.hears:
            message = "this checkpoint was not trained to transcribe its input (train --heard-weight)"
            raise ProtocolError(ErrorCode.UNSUPPORTED, message, event_id, "audio.input.transcription")
    tools = session.tools if cfg.tools is None else [tool_spec(t, event_id) for t in cfg.tools]
    return session.configure(
        instructions=cfg.instructions if cfg.instructions is not None else session.instructions,
        sampling=sampling,
        eagerness=eagerness,
        transcribe=transcribe,
        input_rate=in_rate or session.input_rate,
        output_rate=out_rate or session.output_rate,
        output_transport=(out.transport if out else None) or session.output_transport,
        tools=tools,
    )


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
