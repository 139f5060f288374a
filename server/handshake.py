"""The realtime WebSocket handshake: checks, resumption handles and admission, then the `Connection`.

Bad handshakes (Origin, credential, draining) are denied with an HTTP status before the
socket is accepted; a resumption handle is redeemed (every check before any model work)
or refused; a full or restarting server refuses with `server_busy` (1013) or
`engine_restarting` (1012); everything else runs a `Connection` (server/connection.py).
Every accepted socket names the replica in `x-microturn-replica`. This module knows
nothing about events or the engine.
"""

from __future__ import annotations

from fastapi import WebSocket
from fastapi.responses import JSONResponse

from .auth import QUERY_SECRET_PARAM, SECRET_PREFIX
from .connection import Connection, ServerState, refuse
from .errors import HTTP_STATUS, ErrorCode, error_payload
from .resume_record import Resumed, redeem
from .resumption import (
    RESUMABLE_QUERY_PARAM,
    RESUME_QUERY_PARAM,
    ResumeError,
    binding,
    presented_credential,
    principal,
)

REPLICA_HEADER = b"x-microturn-replica"  # names the replica on every response (HTTP and handshake)


async def serve_websocket(ws: WebSocket, state: ServerState) -> None:
    headers = ws.headers
    # the address the connection arrived on, not the Host header: a DNS-rebinding page sets that
    server = ws.scope.get("server")
    local_addr = (str(server[0]), int(server[1])) if server and server[1] is not None else None
    if not state.auth.origin_allowed(headers.get("origin"), local_addr):
        return await _deny(ws, state, ErrorCode.FORBIDDEN_ORIGIN, "Origin not allowed")
    subprotocols = list(ws.scope.get("subprotocols", []))
    grant = state.auth.authorize(headers.get("authorization"), ws.query_params.get(QUERY_SECRET_PARAM),
                                 subprotocols)
    if grant is None:
        return await _deny(ws, state, ErrorCode.UNAUTHORIZED, "missing, wrong, expired or used credential")
    if state.draining:
        return await _deny(ws, state, ErrorCode.SERVER_DRAINING, "server is shutting down")
    replica = [(REPLICA_HEADER, state.settings.replica.encode())]
    await ws.accept(subprotocol=grant.subprotocol, headers=replica)
    credential = presented_credential(headers.get("authorization"), ws.query_params.get(QUERY_SECRET_PARAM),
                                      subprotocols)
    bind = binding(principal(credential, state.auth.enabled, SECRET_PREFIX))
    handle = ws.query_params.get(RESUME_QUERY_PARAM)
    resumed = Resumed()
    if handle is not None and state.resume is not None:
        try:  # every check before any model work, and the handle is spent only once they all passed
            resumed = await redeem(state.resume, handle, bind, state.connections)
        except ResumeError as exc:
            return await refuse(ws, state, exc.code, exc.message)
    held = len(state.connections) + (len(state.resume.parked) if state.resume is not None else 0)
    if resumed.session is None and (not state.ready or state.tick is None or held >= state.capacity):
        resumed.undo()
        return await refuse(
            ws, state, ErrorCode.SERVER_BUSY, f"all {state.capacity} session slots are taken"
        )
    if not state.tick.engine_up:
        resumed.undo()
        if resumed.session is not None and state.resume is not None:  # claimed, but it cannot go on now
            state.resume.end_parked(resumed.session)
        message = "the engine is restarting; reconnect in a moment"
        return await refuse(ws, state, ErrorCode.ENGINE_RESTARTING, message)
    beta = "realtime=v1" in headers.get("openai-beta", "")
    asked = handle is not None or ws.query_params.get(RESUMABLE_QUERY_PARAM) == "1"
    resumable = state.resume is not None and (state.settings.resume_events or asked)
    conn = Connection(ws, state, beta, session=resumed.session, bind=bind, resumable=resumable)
    await conn.run(grant, resumed.record if resumed.session is None else None, resumed.undo)


async def _deny(ws: WebSocket, state: ServerState, code: ErrorCode, message: str) -> None:
    state.metrics.errors.labels(code.value).inc()
    body = {"type": "error", "error": error_payload(code, message)}
    await ws.send_denial_response(JSONResponse(body, status_code=HTTP_STATUS[code]))
