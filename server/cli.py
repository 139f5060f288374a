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

Failing politely: `check_settings` rejects a bad preset, checkpoint or device before anything
starts (the engine process takes seconds to come up; a typo should not). A load error that only the
engine sees (damaged weights) is caught by `StartupWatch` and also reported as one line; uvicorn's
start-up lines are held until the app is up, and the demo page banner is printed only then. Exit
codes (the README's "Command line" table): 1 = the world disagrees (missing checkpoint, no CUDA,
port taken, load failure), 2 = a bad value (unknown preset, invalid setting).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

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
EXIT_FAILURE = 1  # same codes as cli.py: the arguments are fine, the world is not
EXIT_USAGE = 2  # a value no run could accept (argparse uses 2 too)
CONFIG_FILE = "config.json"  # model/checkpoint.py's name; not imported from there: it brings torch
CUDA_PROBE_TIMEOUT_S = 120.0  # importing torch on a cold disk can take a while
# the server process never imports torch (the engine process does), so CUDA is asked in a child
CUDA_PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


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


class ServeError(Exception):
    """A reason `microturn serve` cannot run, with its exit code; reported as one line."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_settings(settings: ServerSettings) -> None:
    """Raise `ServeError` for what can be checked in milliseconds, before the engine process starts."""
    if settings.checkpoint:
        _check_checkpoint(Path(settings.checkpoint))
    else:
        _check_preset(settings.preset)
    if settings.device.startswith("cuda"):
        _check_cuda(settings.device)


def _check_checkpoint(directory: Path) -> None:
    hint = "give a directory `microturn train` or `microturn export` wrote, or leave --checkpoint out"
    if not directory.is_dir():
        raise ServeError(f"{directory}: checkpoint directory not found ({hint})")
    if not (directory / CONFIG_FILE).is_file():
        raise ServeError(f"{directory}: not a checkpoint, it has no {CONFIG_FILE} ({hint})")


def _check_preset(name: str) -> None:
    from ..model.config import PRESETS  # names only: no torch

    if name not in PRESETS:
        raise ServeError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}", EXIT_USAGE)


def _check_cuda(device: str) -> None:
    count = cuda_device_count()
    _, _, index = device.partition(":")
    wanted = int(index) + 1 if index.isdigit() else 1
    if count == 0:
        raise ServeError(f"--device {device}: CUDA is not available to this torch build or machine; "
                         "use --device cpu (or auto)")
    if count < wanted:
        raise ServeError(f"--device {device}: only {count} CUDA device(s) here; use cuda:0..cuda:{count - 1}")


def cuda_device_count() -> int:
    """CUDA devices torch sees, asked in a child process; 0 when torch cannot say."""
    try:
        probe = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True,
                               timeout=CUDA_PROBE_TIMEOUT_S)
        return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


class StartupWatch(logging.Filter):
    """Holds uvicorn's start-up log lines until the app is up (then lets them through) and records why
    start-up failed (then drops them and uvicorn's traceback), so a failure reads as one line."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        self.error: BaseException | None = None
        self._held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.up:
            return True
        if self.error is None:
            self._held.append(record)
        return False

    def wrap(self, app: FastAPI, on_up: Callable[[], None]) -> None:
        """Make the app's lifespan report to this watch; `on_up` runs once the app is ready."""
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: FastAPI) -> AsyncIterator[object]:
            started = False
            try:
                async with inner(a) as state:
                    started = True
                    self._release()
                    on_up()
                    yield state
            except Exception as exc:
                if not started:  # a failure at shutdown is not a start-up failure
                    self.error = exc
                raise

        app.router.lifespan_context = lifespan

    def last_held(self) -> str:
        return self._held[-1].getMessage() if self._held else ""

    def _release(self) -> None:
        self.up = True
        held, self._held = self._held, []
        for record in held:
            logging.getLogger(record.name).handle(record)


def banner(settings: ServerSettings) -> str:
    shown = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    auth = "on" if settings.auth_enabled else "off (no MICROTURN_API_KEYS)"
    model = settings.checkpoint or f"preset {settings.preset} with seeded random weights (it streams noise)"
    return (f"microturn: demo page http://{shown}:{settings.port}/  realtime ws://{shown}:{settings.port}"
            f"/v1/realtime  auth {auth}  model {model}")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_settings(args: argparse.Namespace) -> ServerSettings:
    try:
        return settings_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ServeError(f"invalid setting {where}: {first['msg']}", EXIT_USAGE) from None


def run_server(settings: ServerSettings) -> None:
    """Start the engine and serve until stopped; raises `ServeError` when it cannot start."""
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    watch = StartupWatch()
    watch.wrap(app, lambda: print(banner(settings), flush=True))
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(watch)
    try:
        try:
            sock = bound_send_buffer(config.bind_socket(), settings)
        except (OSError, SystemExit) as exc:  # uvicorn logs why the bind failed, then exits
            reason = watch.last_held() or one_line(exc)
            raise ServeError(f"cannot listen on {settings.host}:{settings.port} ({reason}); "
                             "pick another --port or stop what holds it") from None
        DrainingServer(config, app, settings.drain_timeout_s).run(sockets=[sock])
    except SystemExit:  # uvicorn exits 3 when the lifespan failed
        if watch.error is None:
            raise
    finally:
        uvicorn_log.removeFilter(watch)
    if watch.error is not None:
        raise ServeError(f"the model could not load: {one_line(watch.error)}")


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args)
        check_settings(settings)
        run_server(settings)
    except ServeError as exc:
        print(f"microturn serve: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
