"""`microturn serve`: run the realtime server under uvicorn with a graceful SIGTERM drain.

`serve_main(args)` merges the CLI flags (host, port, preset, checkpoint, device) over
the `MICROTURN_*` settings, prints the demo page URL and runs uvicorn. SIGTERM starts
`app.drain` (readyz false, go_away to live sessions, wait up to drain_timeout_s) and
exits when it is done; a second signal or Ctrl-C exits at once. The listening socket
carries `send_buffer_bytes` as SO_SNDBUF, which accepted connections inherit: without
it loopback autotuning lets a client that never reads absorb megabytes (tens of seconds
of audio) before the output queue can notice. uvicorn logs every request's path with its
query string (HTTP in `uvicorn.access`, WebSocket handshakes in `uvicorn.error`), where a
browser's `client_secret` travels: `RedactQuerySecrets` masks such values first. This
module knows nothing about sessions or the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from .app import create_app, drain
from .settings import ServerSettings
from .transport import CuttableWebSockets

log = logging.getLogger(__name__)
FLAG_FIELDS = ("host", "port", "preset", "checkpoint", "device", "dtype")
# loggers uvicorn writes request paths (with the query string) to
REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error")
# query parameters whose value is masked: the credential auth reads, and look-alikes clients try
SECRET_QUERY = re.compile(r"([?&][^=&\s\"]*(?:secret|key|token|password|auth)[^=&\s\"]*=)[^&#\s\"]*", re.I)
REDACTED = "[redacted]"


class RedactQuerySecrets(logging.Filter):
    """Mask secret query values in a record's message and arguments before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_query(text: str) -> str:
    return SECRET_QUERY.sub(rf"\1{REDACTED}", text)


def install_log_redaction() -> None:
    """Idempotent: uvicorn's logging config keeps logger filters, so this survives a new Config."""
    for name in REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuerySecrets) for f in logger.filters):
            logger.addFilter(RedactQuerySecrets())


class DrainingServer(uvicorn.Server):
    """uvicorn would close live WebSockets at once on SIGTERM (1012); drain them first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._drain_task is not None:
            return super().handle_exit(sig, frame)
        log.info("SIGTERM: draining (up to %.0f s)", self._drain_timeout_s)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await drain(self._app, self._drain_timeout_s)
        finally:
            self.should_exit = True


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name, None) is not None}
    return ServerSettings(**overrides)


def uvicorn_config(app: FastAPI, settings: ServerSettings, **kw: object) -> uvicorn.Config:
    """The uvicorn config the settings ask for (message size, pings, log redaction); tests reuse it."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        ws_per_message_deflate=False,
        **{"ws": CuttableWebSockets, **kw},  # the app can cut a stuck peer's socket (server/transport.py)
    )
    install_log_redaction()  # after Config: it (re)configures uvicorn's loggers
    return config


def bound_send_buffer(sock: socket.socket, settings: ServerSettings) -> socket.socket:
    """Set the listener's SO_SNDBUF (inherited by every accepted connection) as the settings ask."""
    if settings.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    return sock


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app, settings.drain_timeout_s)
    shown = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    auth = "on" if settings.auth_enabled else "off (no MICROTURN_API_KEYS)"
    model = settings.checkpoint or f"preset {settings.preset} with seeded random weights (it streams noise)"
    print(
        f"microturn: demo page http://{shown}:{settings.port}/  realtime ws://{shown}:{settings.port}/v1/realtime"
        f"  auth {auth}  model {model}",
        flush=True,
    )
    server.run(sockets=[bound_send_buffer(config.bind_socket(), settings)])
    return 0
