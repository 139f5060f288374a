"""Handshake authentication: API keys, single-use client secrets, and the Origin allowlist.

A WebSocket presents a credential as `Authorization: Bearer <key or secret>`, as the
subprotocol `openai-insecure-api-key.<key or secret>` (what browsers can send), or as
the `client_secret` query parameter. API keys are long-lived; client secrets are minted
by `POST /v1/realtime/client_secrets` (which itself needs an API key), expire after a
TTL and work once. Auth is on when any API key is configured; with none, any
connection is let in (local use). The Origin check runs either way: a browser Origin
must be one of the server's public origins (configured, or derived from the address the
connection arrived on, never from the Host header, which a DNS-rebinding page controls)
or on the allowlist. The credential subprotocol is never echoed back in the handshake.
This module knows nothing about sessions or the engine.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from .settings import ServerSettings

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."
REALTIME_SUBPROTOCOL = "realtime"
QUERY_SECRET_PARAM = "client_secret"  # the one query parameter read as a credential
SECRET_PREFIX = "ek_"
SECRET_BYTES = 24


@dataclass(frozen=True)
class Grant:
    """A connection let in: which subprotocol to echo and the session config a secret carried."""

    subprotocol: str | None
    session: dict | None


@dataclass
class _Secret:
    expires_at: float  # time.time()
    session: dict | None


class Authenticator:
    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self._keys = [key.encode() for key in settings.api_keys]
        self._secrets: OrderedDict[str, _Secret] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def is_api_key(self, credential: str | None) -> bool:
        if credential is None:
            return False
        return any(hmac.compare_digest(credential.encode(), key) for key in self._keys)

    def http_allowed(self, authorization: str | None) -> bool:
        return not self.enabled or self.is_api_key(_bearer(authorization))

    def mint(self, ttl_s: float | None, session: dict | None) -> dict:
        """A new single-use secret, OpenAI-shaped: {value, expires_at, session}."""
        ttl = min(ttl_s or self._settings.client_secret_ttl_s, self._settings.max_client_secret_ttl_s)
        self._evict(time.time())
        while len(self._secrets) >= self._settings.max_client_secrets:
            self._secrets.popitem(last=False)
        value = SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
        expires_at = time.time() + ttl
        self._secrets[value] = _Secret(expires_at, session)
        return {"value": value, "expires_at": int(expires_at), "session": session or {}}

    def _evict(self, now: float) -> None:
        for value in [v for v, s in self._secrets.items() if s.expires_at <= now]:
            del self._secrets[value]

    def _redeem(self, credential: str) -> _Secret | None:
        secret = self._secrets.pop(credential, None)  # single use: gone even if expired
        if secret is None or secret.expires_at <= time.time():
            return None
        return secret

    def authorize(
        self, authorization: str | None, query_secret: str | None, subprotocols: list[str]
    ) -> Grant | None:
        """Check a WebSocket handshake's credential; None = refuse."""
        from_protocol = next(
            (s[len(SUBPROTOCOL_KEY_PREFIX) :] for s in subprotocols if s.startswith(SUBPROTOCOL_KEY_PREFIX)),
            None,
        )
        # Browsers fail a handshake whose selected subprotocol they did not offer, and Chromium also
        # one that selects none of those offered; so echo a non-secret one when there is one.
        plain = [s for s in subprotocols if not s.startswith(SUBPROTOCOL_KEY_PREFIX)]
        echo = REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in plain else (plain[0] if plain else None)
        credential = _bearer(authorization) or from_protocol or query_secret
        if credential is not None and credential.startswith(SECRET_PREFIX):
            secret = self._redeem(credential)
            return Grant(echo, secret.session) if secret is not None else None
        if not self.enabled or self.is_api_key(credential):
            return Grant(echo, None)
        return None

    def origin_allowed(self, origin: str | None, local_addr: tuple[str, int] | None) -> bool:
        """Non-browser clients send no Origin; browsers must come from a public origin or the allowlist.

        `local_addr` is the server address the connection arrived on (the ASGI `server`), which
        gives the default public origins when none are configured.
        """
        if origin is None:
            return True
        allowed = self._settings.allowed_origins
        if "*" in allowed or origin.rstrip("/") in (o.rstrip("/") for o in allowed):
            return True
        key = _origin_key(origin)
        public = self._settings.public_origins or _address_origins(local_addr or self._bind_addr())
        return key is not None and any(key == _origin_key(o) for o in [*public, *allowed])

    def _bind_addr(self) -> tuple[str, int]:
        return self._settings.host, self._settings.port


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the scheme's default port filled in; None when it is no origin."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS.get(scheme)


def _address_origins(addr: tuple[str, int]) -> list[str]:
    """The http origins a page served from this address has: loopback also by its names."""
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [f"http://{host}:{port}"]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers this way
    if ip.is_loopback:
        return [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"]
    return [f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"]


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
