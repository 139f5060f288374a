"""Server settings: every limit and knob, from `MICROTURN_*` environment variables or code.

`ServerSettings` is a pydantic-settings model; `microturn serve` flags override the
model/host fields. Each field's description is the README's settings table (keep them
in step). This module knows nothing about sockets, engines or sessions.
"""

from __future__ import annotations

import socket
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .protocol import DEFAULT_PCM_RATE

CommaList = Annotated[list[str], NoDecode]
CpuList = Annotated[list[int], NoDecode]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MICROTURN_", extra="ignore")

    # --- where and what to serve ---
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, description="TCP port to bind")
    preset: str = Field("tiny", description="model preset used when no checkpoint is given (seeded weights)")
    checkpoint: str | None = Field(None, description="checkpoint directory to load instead of a preset")
    device: str = Field("auto", description="engine device: auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="engine dtype: auto = bf16 on CUDA, fp32 on CPU (bit-exact batch invariance)"
    )
    seed: int = Field(0, description="seed of the preset's random weights")
    max_sessions: int = Field(
        64, ge=1, description="engine slots = concurrent sessions; more get server_busy"
    )

    # --- the engine process ---
    engine_process: bool = Field(
        True, description="run the engine in its own process (restarted when it dies or hangs); false = a "
        "thread of the server process (debugging, tests)",
    )
    engine_threads: int = Field(
        0, ge=0, description="torch intra-op threads of the engine; 0 = one per CPU it may run on"
    )
    engine_cpus: CpuList = Field(
        default_factory=list, description="comma-separated CPU ids the engine process is pinned to "
        "(the server process keeps the rest); empty = no pinning",
    )
    engine_call_timeout_s: float = Field(
        2.0, gt=0, description="a step, join or leave the engine process has not answered in this long "
        "counts as hung: it is killed, live sessions are closed 1012 and it restarts",
    )
    engine_start_timeout_s: float = Field(
        600.0, gt=0, description="longest an engine process may take to load, warm up and capture graphs"
    )

    # --- auth ---
    api_keys: CommaList = Field(
        default_factory=list, description="comma-separated API keys; auth is on when any is set"
    )
    allowed_origins: CommaList = Field(
        default_factory=list,
        description="comma-separated browser Origins allowed besides same-origin; `*` allows any",
    )
    client_secret_ttl_s: float = Field(
        60.0, gt=0, description="default lifetime of a minted client secret (single use)"
    )
    max_client_secret_ttl_s: float = Field(600.0, gt=0, description="longest lifetime a client may ask for")
    max_client_secrets: int = Field(10_000, ge=1, description="unused secrets held at once; oldest dropped")

    # --- per-message and per-session input limits ---
    max_message_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="largest WebSocket message; larger closes the session 1009"
    )
    max_text_chars: int = Field(4096, ge=1, description="longest text in one conversation.item.create")
    max_task_input_chars: int = Field(
        4096, ge=1, description="longest input of one task.create; longer is refused (text_too_long)"
    )
    max_text_queue_tokens: int = Field(
        16_384, ge=1, description="queued text-in tokens per session before text is refused"
    )
    max_input_ahead_ms: int = Field(
        2000, ge=200, description="input audio buffered ahead of the clock; beyond it audio is refused"
    )
    jitter_ms: int = Field(
        100, ge=0, description="audio buffered before a stream starts; later gaps are padded (underrun)"
    )
    # --- browser origin and camera image checks ---
    public_origins: CommaList = Field(
        default_factory=list,
        description="comma-separated origins this server is served at (e.g. https://talk.example behind a "
        "proxy); empty = the address a connection arrived on (loopback: http://127.0.0.1:PORT and "
        "http://localhost:PORT), never the Host header",
    )
    max_image_pixels: int = Field(
        3840 * 2160, ge=1, description="largest camera image (width x height, read from its header before "
        "decoding); larger is refused with invalid_image",
    )

    # --- output ---
    max_output_queue_turns: int = Field(
        25, ge=1, description="unsent micro-turns per session; a client this far behind is closed (1008)"
    )
    send_buffer_bytes: int = Field(
        65_536, ge=0, description="SO_SNDBUF of every connection (Linux doubles it; 0 = kernel autotuning): "
        "bounds the output a client that stops reading can hide in kernel buffers before the output "
        "queue passes max_output_queue_turns and closes it (1008 slow_consumer)",
    )
    output_audio: Literal["json", "binary"] = Field(
        "json", description="default audio transport: json deltas (OpenAI) or binary 0x81 frames"
    )
    output_rate: Literal[16_000, 24_000] = Field(  # protocol.PCM_RATES, spelled out for the type
        DEFAULT_PCM_RATE, description="default sample rate of JSON audio deltas (OpenAI clients expect 24000)"
    )

    # --- barge-in (energy voice activity on the input) ---
    barge_in: bool = Field(True, description="user speech over model speech bumps the epoch and flushes")
    vad_threshold_dbfs: float = Field(-35.0, description="input chunk level counted as speech")
    speaking_threshold_dbfs: float = Field(-45.0, description="output chunk level counted as model speech")

    # --- connection lifetime ---
    ping_interval_s: float = Field(20.0, gt=0, description="WebSocket ping period")
    ping_timeout_s: float = Field(20.0, gt=0, description="close when a ping is not answered this fast")
    idle_timeout_s: float = Field(
        600.0, ge=0, description="close after this long with no client message; 0 = never"
    )
    max_session_s: float = Field(0.0, ge=0, description="longest session in seconds; 0 = unlimited")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: time live sessions get after go_away")

    # --- background model (task.create, model task markers) ---
    background: bool = Field(
        True, description="enable background tasks (task.create and model task markers)"
    )
    background_backend: Literal["local", "openai"] = Field(
        "local", description="local = offline built-in tools; openai = an OpenAI-compatible endpoint"
    )
    background_openai_base_url: str = Field(
        "http://127.0.0.1:8001/v1", description="chat-completions endpoint root (vLLM, SGLang, llama.cpp)"
    )
    background_openai_model: str = Field("default", description="model name at the background endpoint")
    background_openai_api_key: str = Field("none", description="key for the background endpoint")
    background_max_concurrent: int = Field(
        16, ge=1, description="background tasks running at once, all sessions"
    )
    background_max_per_session: int = Field(
        4, ge=1, description="background tasks per session; more get task_limit"
    )
    background_timeout_s: float = Field(60.0, gt=0, description="default background task timeout")
    background_text_in: Literal["stream", "result"] = Field(
        "stream", description="what of a task enters the model's text-in: its streamed steps, or only the "
        "final result (the tool's output when it has one: what the demo model was trained on)"
    )
    debug_events: bool = Field(
        False, description="send debug.text_in events (what entered the model's text-in slots); or ?debug=1"
    )
    task_events: bool = Field(
        False, description="send microturn's task.* events to every session; else only to one that asks "
        "(?task_events=1, session.update task_events, or its own task.create): OpenAI clients validate events"
    )

    # --- replicas and session resumption (server/resumption.py) ---
    replica_name: str | None = Field(
        None, description="this replica's name, in session.created and the x-microturn-replica response "
        "header; none = the host name (a pod's name under Kubernetes)",
    )
    resume_keys: CommaList = Field(
        default_factory=list, description="comma-separated secrets sealing resumption handles, the same on "
        "every replica (the first seals, all open: rotate by prepending); empty = a random key, so sessions "
        "resume on this replica only",
    )
    resume_ttl_s: float = Field(
        300.0, gt=0, description="lifetime of a resumption handle; a newer one is sent after every finished "
        "turn and at least every third of this",
    )
    resume_grace_s: float = Field(
        15.0, ge=0, description="after an unclean close, how long a resumable session keeps its slot (output "
        "dropped) for a reconnect to continue it exactly; 0 = never parked",
    )
    resume_events: bool = Field(
        False, description="make every session resumable (session.resumption_update events); else only one "
        "that asks with ?resumable=1: OpenAI clients validate events",
    )
    max_resume_cache: int = Field(
        100_000, ge=1, description="sessions whose redeemed handle generation is remembered (replay cache); "
        "when full, resumptions are refused until entries expire",
    )

    @field_validator("api_keys", "allowed_origins", "public_origins", "engine_cpus", "resume_keys",
                     mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def replica(self) -> str:
        return self.replica_name or socket.gethostname()


def settings_table() -> str:
    """The README's settings table, generated from the field descriptions."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        if isinstance(default, list):
            default = ",".join(default) or None
        shown = "none" if default is None else f"`{default}`"
        rows.append(f"| `MICROTURN_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
