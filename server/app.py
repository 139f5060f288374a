"""The FastAPI application: routes, engine start-up, and the graceful drain.

`create_app(settings, engine=None)` builds the app; with no engine given, the lifespan
builds one from the settings (preset with seeded weights, or a checkpoint) off the
event loop and warms it up. Routes: `GET /` (the web demo from clients/web when it is
there, else a placeholder), `WS /v1/realtime`, `POST /v1/realtime/client_secrets`,
`/healthz`, `/readyz` (503 while starting, draining, restarting the engine, or full, so a
balancer's health check sends new sessions elsewhere), `/metrics`; every HTTP response and
handshake names the replica (`x-microturn-replica`). `drain(app, timeout)` is the SIGTERM path:
not ready, refuse new sessions, end parked ones, a last resumption handle then
`session.go_away` to live ones, wait, close the rest. This module
knows nothing about the protocol's events beyond go_away, or about tensors.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import mimetypes
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError

from ..model.engine_core import EngineSpec
from ..model.engine_process import ProcessEngine
from . import protocol as p
from . import server_events as ev
from .auth import Authenticator
from .background_service import BackgroundService
from .connection import ServerState
from .engine_api import EngineAPI
from .errors import HTTP_STATUS, ErrorCode, error_payload
from .handshake import REPLICA_HEADER, serve_websocket
from .metrics import Metrics
from .resumption import Resumption
from .session import Session
from .settings import ServerSettings
from .tick_loop import TickLoop
from .webrtc import CALLS_PATH, hangup_call, serve_call

log = logging.getLogger(__name__)
# Python 3.11 says application/javascript when the OS has no /etc/mime.types (slim images)
mimetypes.add_type("text/javascript", ".js")

DRAIN_POLL_S = 0.05
CLOSE_GRACE_S = 2.0  # after the drain timeout: time for the last sessions to close
PLACEHOLDER_PAGE = """<!doctype html><meta charset="utf-8"><title>microturn</title>
<h1>microturn</h1><p>The realtime server is up. Connect a client to <code>/v1/realtime</code>.
The browser demo page (clients/web) is not installed.</p>"""


def web_dir() -> Path | None:
    """clients/web of this install, found by package path (the server never imports the clients)."""
    spec = importlib.util.find_spec("microturn.clients")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "web"
    return path if (path / "index.html").is_file() else None


def engine_spec(settings: ServerSettings) -> EngineSpec:
    return EngineSpec(
        checkpoint=settings.checkpoint, preset=settings.preset, seed=settings.seed, device=settings.device,
        dtype=settings.dtype, max_slots=settings.max_sessions, threads=settings.engine_threads,
        cpus=tuple(settings.engine_cpus),
    )


def build_engine(settings: ServerSettings) -> EngineAPI:
    """The engine core in its own process (the server then never imports torch), or in this one."""
    spec = engine_spec(settings)
    if settings.engine_process:
        engine = ProcessEngine(spec, settings.engine_call_timeout_s, settings.engine_start_timeout_s)
        engine.start()
        return engine
    from ..model.engine_core import build_engine as build_local  # brings torch into this process

    local = build_local(spec)
    local.warmup()
    return local


class ExpiresAfter(BaseModel):
    anchor: str = "created_at"
    seconds: float = Field(gt=0)


class ClientSecretRequest(BaseModel):
    expires_after: ExpiresAfter | None = None
    session: p.SessionConfig | None = None


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # json.loads would take NaN and Infinity


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: the reply could not be rendered back as JSON
        raise ValueError(f"{text} is out of range")
    return value


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes while it streams in (never held whole first)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_secret_request(raw: bytes) -> ClientSecretRequest:
    """An empty or `null` body asks for the defaults; anything unparsable is a BadRequest."""
    if not raw.strip():
        return ClientSecretRequest()
    try:
        data = json.loads(raw, parse_constant=_no_constants, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if data is None:
        return ClientSecretRequest()
    if (bad := p.unencodable_text(data)) is not None:
        raise BadRequest(f"{bad}: text is not valid Unicode (lone surrogate)", bad)
    try:
        return ClientSecretRequest.model_validate(data)
    except ValidationError as exc:
        # the message names the field, never echoes the input (it may not even serialise)
        first = exc.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise BadRequest(f"{param or 'body'}: {first['msg']}", param) from None
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"invalid body: {exc}") from None


def create_app(
    settings: ServerSettings | None = None,
    engine: EngineAPI | None = None,
    background: BackgroundService | None = None,
) -> FastAPI:
    """`background` runs the sessions' background tasks (the caller closes it); by default the app makes
    one when `settings.background` is on."""
    settings = settings or ServerSettings()
    state = ServerState(settings, Authenticator(settings), Metrics(), background=background)

    def end_parked(session: Session) -> None:  # a parked session's grace ran out, or the drain began
        session.close()
        if state.tick is not None:
            state.tick.leave_soon(session)

    state.resume = Resumption(settings, end_parked)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng: EngineAPI = engine if engine is not None else await asyncio.to_thread(build_engine, settings)
        work = None
        if state.background is None and settings.background:
            work = BackgroundService(settings, eng.tokenizer, state.metrics)
            state.background = work
        if state.background is not None:
            if state.background.metrics is None:
                state.background.metrics = state.metrics
            await state.background.warm()
        state.tick = TickLoop(eng, state.metrics, asyncio.get_running_loop())
        state.capacity = min(settings.max_sessions, eng.max_slots)
        state.metrics.capacity.set(state.capacity)
        state.metrics.set_build_info(str(eng.device), root)  # root: the model card's name, set below
        state.tick.start()
        state.ready = True
        try:
            yield
        finally:
            await drain(app, 0.0)
            await asyncio.to_thread(state.tick.stop)
            if engine is None:  # ours to stop; a caller's engine is the caller's
                await asyncio.to_thread(eng.close)
            if work is not None:
                await work.close()

    app = FastAPI(title="microturn", lifespan=lifespan)
    app.state.server = state

    @app.middleware("http")
    async def name_replica(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        response.headers[REPLICA_HEADER.decode()] = settings.replica
        return response

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        engine_up = state.tick is not None and state.tick.engine_up
        held = len(state.connections) + len(state.resume.parked)
        full = held >= state.capacity
        # full counts as not ready: a balancer's health check then sends new sessions elsewhere
        ready = state.ready and not state.draining and engine_up and not full
        body = {
            "ready": ready,
            "draining": state.draining,
            "full": full,
            "replica": settings.replica,
            "parked": len(state.resume.parked),
            "engine": "up" if engine_up else ("restarting" if state.ready else "starting"),
            "sessions": len(state.connections),
            "engine_rows": state.tick.engine.rows if state.tick is not None else 0,
            "capacity": state.capacity,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    created = int(time.time())
    # the checkpoint's directory name, not its path: the card is served to any caller with a key
    root = Path(settings.checkpoint).name if settings.checkpoint else f"preset:{settings.preset}"

    def unauthorized() -> JSONResponse:
        state.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
        return JSONResponse({"error": error_payload(ErrorCode.UNAUTHORIZED, "API key required")}, 401)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        """The served model, as OpenAI-compatible servers list theirs (the SDK's `models.list()`)."""
        if not state.auth.http_allowed(request.headers.get("authorization")):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [ev.model_card(created, root)]})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        if not state.auth.http_allowed(request.headers.get("authorization")):
            return unauthorized()
        if model_id != ev.MODEL_ID:
            code = ErrorCode.MODEL_NOT_FOUND
            state.metrics.errors.labels(code.value).inc()
            error = error_payload(code, f"no model {model_id!r} here; this server serves {ev.MODEL_ID!r}",
                                  param="model")
            return JSONResponse({"error": error}, HTTP_STATUS[code])
        return JSONResponse(ev.model_card(created, root))

    @app.post("/v1/realtime/client_secrets")
    async def client_secrets(request: Request) -> JSONResponse:
        # auth first: the body is not even read for a caller without a key
        if not state.auth.http_allowed(request.headers.get("authorization")):
            return unauthorized()
        try:
            body = parse_secret_request(await read_body(request, settings.max_message_bytes))
        except BadRequest as exc:
            code = ErrorCode.INVALID_REQUEST
            state.metrics.errors.labels(code.value).inc()
            error = error_payload(code, exc.message, param=exc.param)
            return JSONResponse({"error": error}, HTTP_STATUS[code])
        session = body.session.model_dump(exclude_none=True) if body.session else None
        ttl = body.expires_after.seconds if body.expires_after else None
        return JSONResponse(state.auth.mint(ttl, session))

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await serve_websocket(ws, state)

    @app.post(CALLS_PATH, status_code=201)
    async def realtime_call(request: Request) -> Response:
        """WebRTC: an SDP offer in, the answer out; the same session on an RTCPeerConnection."""
        return await serve_call(request, state)

    @app.post(CALLS_PATH + "/{call_id}/hangup")
    async def realtime_call_hangup(call_id: str, request: Request) -> Response:
        return await hangup_call(request, state, call_id)

    web = web_dir()
    if web is not None:
        app.mount("/", StaticFiles(directory=web, html=True), name="web")
    else:

        @app.get("/", response_class=HTMLResponse)
        async def index() -> str:
            return PLACEHOLDER_PAGE

    return app


async def drain(app: FastAPI, timeout_s: float) -> None:
    """Stop admitting, tell live sessions to go away, wait up to `timeout_s`, then close the rest."""
    state: ServerState = app.state.server
    state.draining = True
    if state.resume is not None:
        state.resume.parked.end_all()  # their clients hold handles: they resume on another replica
    # resumable sessions get their last handle first (sealing waits on a thread, so all at once)
    await asyncio.gather(*(conn.migrate(int(timeout_s * 1000)) for conn in list(state.connections)),
                         return_exceptions=True)
    deadline = time.monotonic() + timeout_s
    while state.connections and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    for conn in list(state.connections):
        conn.request_close(ErrorCode.SERVER_DRAINING, "server shutting down")
    deadline = time.monotonic() + CLOSE_GRACE_S
    while state.connections and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    if state.connections:
        log.warning("%d session(s) did not close during the drain", len(state.connections))
