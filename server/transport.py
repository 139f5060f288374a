"""Cutting a WebSocket's TCP connection from the app: the one thing ASGI has no message for.

An ASGI `websocket.close` queues the close frame behind whatever is still unsent, and uvicorn
closes a transport by flushing it first, so a peer that never reads holds the socket, its kernel
buffers and its fd for as long as it likes. `CuttableWebSockets` is the WebSocket protocol uvicorn
would pick anyway, with one ASGI scope extension, `ABORT_EXTENSION`: a call that resets the
connection at once. It also cuts a connection that still lingers `LINGER_AFTER_APP_S` after the
app returned, whatever closing path left it stuck.

Why an extension set by the protocol, not a walk from Starlette's `WebSocket._send` to uvicorn's
protocol object: the send callable reaching the app is wrapped by every middleware (Starlette's
exception middleware already wraps it), so that walk breaks silently, while a scope extension
is how ASGI servers offer extra capabilities and reaches the app through any middleware. The
subclass relies only on asyncio's `connection_made`/`connection_lost` and on uvicorn's
protocols calling `self.app` (all three of them do). An app served without it finds no
extension, and `abort` says so. This module knows nothing about sessions or the protocol.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

ABORT_EXTENSION = "microturn.transport.abort"
# uvicorn waits up to 10 s for the peer's close reply, then flushes; past this the peer is stuck
LINGER_AFTER_APP_S = 15.0
_RESET_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and drops the buffers

assert AutoWebSocketsProtocol is not None, "uvicorn found no WebSocket library"


def reset(transport: asyncio.BaseTransport) -> None:
    """Drop the connection now: an RST, no FIN_WAIT, no orphaned send buffer left in the kernel."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
        except OSError:
            pass  # already closed under us: abort below is all that is left to do
    transport.abort()


class CuttableWebSockets(AutoWebSocketsProtocol):  # type: ignore[misc, valid-type]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cut_transport: asyncio.BaseTransport | None = None
        self._lost = False
        self._linger: asyncio.TimerHandle | None = None
        app = self.app

        async def app_with_abort(scope: dict, receive: Callable, send: Callable) -> None:
            scope.setdefault("extensions", {})[ABORT_EXTENSION] = {"abort": self.cut}
            try:
                await app(scope, receive, send)
            finally:
                if not self._lost:
                    self._linger = asyncio.get_running_loop().call_later(LINGER_AFTER_APP_S, self.cut)

        self.app = app_with_abort

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._cut_transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def cut(self) -> None:
        if not self._lost and self._cut_transport is not None:
            reset(self._cut_transport)


def abort(scope: dict) -> bool:
    """Reset the connection of this ASGI scope; False when the server offers no way to."""
    extension = scope.get("extensions", {}).get(ABORT_EXTENSION)
    if extension is None:
        return False
    extension["abort"]()
    return True
