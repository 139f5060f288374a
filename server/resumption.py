"""Session resumption: sealed handles that carry a conversation, a replay cache, and parked sessions.

A resumable session (`?resumable=1`, or `resume_events` on) gets a *resumption handle* in
`session.created` and a fresh one in `session.resumption_update` after each finished turn
(and before `session.go_away`). A client reconnects with `?resume_handle=<handle>` within
`resume_ttl_s`:

- on the same replica, within `resume_grace_s` of an unclean close, the session was *parked*
  (`ParkingLot`): its engine slot and KV kept stepping (silence in, output dropped), and the
  new socket takes it over exactly where it is;
- anywhere else (another replica, or after the grace period) the handle's `ResumeRecord` is
  restored into a new slot: settings, the conversation items, the background record with its
  finished results, and the tail of the text record prefilled into the engine's pinned prefix.

server/resume_record.py turns a session into a record and back, and rotates its handles.
`HandleCodec` seals a record: JSON, zlib, then Fernet (AES-128-CBC + HMAC-SHA256) under a
key derived from the shared `resume_keys` (the first seals, all open: rotate by prepending),
so replicas need no shared store. `open` bounds the handle's size before decrypting and the
plaintext's size while decompressing, and every refusal is a `ResumeError` whose code
(server/errors.py) names it: invalid (forged, garbled, too big), expired, replayed, or bound
to other credentials. `ReplayCache` makes handles single-use per replica: a session's
handles carry a generation that grows with every rotation, and once generation n was
redeemed here nothing at or below n is taken again. Sealing and opening run off the event
loop (the callers use `asyncio.to_thread`). This module knows nothing about sockets or the
engine's internals.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .auth import SUBPROTOCOL_KEY_PREFIX
from .errors import ErrorCode
from .settings import ServerSettings

RESUME_QUERY_PARAM = "resume_handle"  # the query parameter a reconnect carries its handle in
RESUMABLE_QUERY_PARAM = "resumable"  # ?resumable=1 opts a session in to handles
# Handles travel in the request line, which uvicorn's WebSocket layer caps at 8 KiB (and HAProxy's
# default buffer at 16 KiB): the bound leaves room for the rest of the URL.
MAX_HANDLE_CHARS = 6_000
MAX_RECORD_BYTES = 256 * 1024  # plaintext bound while decompressing (a zlib bomb stops here)
MAX_SEAL_TRIES = 6  # a record too big for MAX_HANDLE_CHARS drops its older half and tries again
MAX_SESSION_ID_CHARS = 64
KDF_INFO = b"microturn resumption handle v1"
BIND_LABEL = b"microturn resumption binding\0"
ANONYMOUS = "anonymous"  # the principal of every connection when auth is off


class ResumeError(Exception):
    """A handle refused before any model work; `code` is its protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ResumeRecord(BaseModel):
    """What a handle carries: enough to rebuild the session on any replica that shares the key."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    sid: str = Field(max_length=MAX_SESSION_ID_CHARS)  # the session keeps its id across moves
    gen: int = Field(ge=0)  # grows with every handle of this session (the replay cache's order)
    bind: str  # digest of the principal that opened the session
    iat: float  # issued at, Unix time
    exp: float  # expires at, Unix time
    replica: str  # the replica that sealed it
    config: dict[str, Any]  # a session.update `session` object: the settings in force
    sampling: dict[str, Any]  # SamplingParams fields (temperatures and top-k the config cannot spell)
    task_events: bool = False
    items: list[dict[str, Any]] = []  # OpenAI conversation items, oldest first (the newest that fit)
    record: list[dict[str, Any]] = []  # the background ConversationRecord entries, oldest first


def principal(credential: str | None, auth_enabled: bool, secret_prefix: str) -> str:
    """Who opened a session, for binding its handles: an API key (by digest), any client secret (they are
    single use, so a reconnect brings a fresh one minted by the same app), or anyone when auth is off."""
    if not auth_enabled or credential is None:
        return ANONYMOUS
    if credential.startswith(secret_prefix):
        return "client_secret"
    return "key:" + hashlib.sha256(credential.encode()).hexdigest()


def binding(who: str) -> str:
    return hashlib.sha256(BIND_LABEL + who.encode()).hexdigest()[:32]


def _fernet(secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KDF_INFO).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))


class HandleCodec:
    """Seal and open resumption handles under the replicas' shared keys."""

    def __init__(self, keys: list[str], ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        # no key configured: a random one, so resumption works on this replica only
        self._fernet = MultiFernet([_fernet(k) for k in keys] or [_fernet(secrets.token_urlsafe(32))])
        self.ttl_s = ttl_s
        self._clock = clock

    def seal(self, record: ResumeRecord) -> str:
        """The handle of `record`; its oldest items are dropped until it fits MAX_HANDLE_CHARS."""
        for _ in range(MAX_SEAL_TRIES):
            raw = zlib.compress(record.model_dump_json().encode(), 6)
            handle = self._fernet.encrypt(raw).decode("ascii")
            if len(handle) <= MAX_HANDLE_CHARS:
                return handle
            record = record.model_copy(update={"items": record.items[len(record.items) // 2 + 1:],
                                               "record": record.record[len(record.record) // 2 + 1:]})
        raise ValueError("a resumption record with no items does not fit a handle")  # settings alone: a bug

    def open(self, handle: str, bind: str) -> ResumeRecord:
        """The record of a valid handle for principal `bind`; ResumeError otherwise (nothing is redeemed)."""
        if not handle or len(handle) > MAX_HANDLE_CHARS:
            message = f"a resumption handle is 1-{MAX_HANDLE_CHARS} characters"
            raise ResumeError(ErrorCode.RESUME_INVALID, message)
        try:
            raw = self._fernet.decrypt(handle.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError, ValueError):
            raise ResumeError(ErrorCode.RESUME_INVALID, "the resumption handle is not one this service sealed"
                              ) from None
        inflate = zlib.decompressobj()
        try:
            plain = inflate.decompress(raw, MAX_RECORD_BYTES)
        except zlib.error:
            raise ResumeError(ErrorCode.RESUME_INVALID, "the resumption handle does not decode") from None
        if inflate.unconsumed_tail or not inflate.eof:
            message = f"the resumption record is over {MAX_RECORD_BYTES} bytes"
            raise ResumeError(ErrorCode.RESUME_INVALID, message)
        try:
            record = ResumeRecord.model_validate(json.loads(plain))
        except (ValueError, ValidationError):
            raise ResumeError(ErrorCode.RESUME_INVALID, "the resumption record is malformed") from None
        if record.exp <= self._clock():
            message = "the resumption handle has expired; start a new session"
            raise ResumeError(ErrorCode.RESUME_EXPIRED, message)
        if not secrets.compare_digest(record.bind, bind):
            raise ResumeError(ErrorCode.RESUME_FORBIDDEN,
                              "the resumption handle belongs to a session opened with other credentials")
        return record

    def expiry(self) -> tuple[float, float]:
        """(issued at, expires at) of a handle sealed now."""
        now = self._clock()
        return now, now + self.ttl_s


class ReplayCache:
    """The highest generation redeemed per session id, until that handle's expiry; bounded, fails closed."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self._max = max_entries
        self._clock = clock
        self._redeemed: OrderedDict[str, tuple[int, float]] = OrderedDict()  # sid -> (gen, exp)

    def __len__(self) -> int:
        return len(self._redeemed)

    def redeem(self, record: ResumeRecord) -> Callable[[], None]:
        """Mark the handle used (ResumeError when it, or a later one of its session, was used here); returns
        the undo, for an admission that fails after the handle was taken."""
        now = self._clock()
        # older generations expire no later than newer ones, so an expired entry guards nothing
        for sid in [s for s, (_, exp) in self._redeemed.items() if exp <= now]:
            del self._redeemed[sid]
        before = self._redeemed.get(record.sid)
        if before is not None and record.gen <= before[0]:
            raise ResumeError(ErrorCode.RESUME_REPLAYED, "this resumption handle was already used; use the "
                              "newest one the session sent")
        if before is None and len(self._redeemed) >= self._max:
            raise ResumeError(ErrorCode.SERVER_BUSY, "too many recent resumptions; try again shortly")
        self._redeemed[record.sid] = (record.gen, record.exp)
        self._redeemed.move_to_end(record.sid)

        def undo() -> None:
            if before is None:
                self._redeemed.pop(record.sid, None)
            else:
                self._redeemed[record.sid] = before

        return undo


@dataclass
class Parked:
    """A session whose socket dropped uncleanly, kept (slot and KV) until its timer ends it."""

    session: Any  # server.session.Session (this module sits below the session layer)
    timer: asyncio.TimerHandle


class ParkingLot:
    """Parked sessions by id, each ended by `end(session)` when its grace period passes unclaimed."""

    def __init__(self, end: Callable[[Any], None]) -> None:
        self._parked: dict[str, Parked] = {}
        self._end = end

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, session: Any, grace_s: float) -> None:
        timer = asyncio.get_running_loop().call_later(grace_s, self._expire, session.id)
        self._parked[session.id] = Parked(session, timer)

    def claim(self, sid: str) -> Any | None:
        """Take a parked session back (for a reconnect); None when none is parked under `sid`."""
        parked = self._parked.pop(sid, None)
        if parked is None:
            return None
        parked.timer.cancel()
        return parked.session

    def end_all(self) -> int:
        """End every parked session now (the drain: their clients hold handles for another replica)."""
        ended = list(self._parked)
        for sid in ended:
            self._expire(sid)
        return len(ended)

    def _expire(self, sid: str) -> None:
        parked = self._parked.pop(sid, None)
        if parked is not None:
            parked.timer.cancel()
            self._end(parked.session)


class Resumption:
    """One replica's resumption state: the codec, the replay cache and the parked sessions."""

    def __init__(self, settings: ServerSettings, end_parked: Callable[[Any], None]) -> None:
        self.codec = HandleCodec(settings.resume_keys, settings.resume_ttl_s)
        self.replay = ReplayCache(settings.max_resume_cache)
        self.end_parked = end_parked  # closes a session and gives its slot back
        self.parked = ParkingLot(end_parked)
        self.grace_s = settings.resume_grace_s
        self.replica = settings.replica
        self.refresh_s = settings.resume_ttl_s / 3

    async def open(self, handle: str, bind: str) -> ResumeRecord:
        """Decrypt and check a handle off the event loop (not yet redeemed)."""
        return await asyncio.to_thread(self.codec.open, handle, bind)


def presented_credential(authorization: str | None, query_secret: str | None, subprotocols: list[str]
                         ) -> str | None:
    """The credential a handshake presented, in the order server/auth.py reads them."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    offered = (s[len(SUBPROTOCOL_KEY_PREFIX):] for s in subprotocols if s.startswith(SUBPROTOCOL_KEY_PREFIX))
    return next(offered, None) or query_secret
