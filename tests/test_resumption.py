"""Resumption handles without a server: sealed, opened, and refused when forged, replayed, expired,
oversized or presented with other credentials; a session's record round-trips into a new session."""

from __future__ import annotations

import base64
import zlib

import pytest
from cryptography.fernet import Fernet

from microturn.model.tokenizer import ByteTokenizer
from microturn.server import resumption as r
from microturn.server.errors import CLOSE_CODES, ErrorCode
from microturn.server.resume_record import restore, snapshot
from microturn.server.session import Session
from microturn.server.settings import ServerSettings

KEY = "shared-replica-secret"
ALICE = r.binding(r.principal("sk-alice", True, "ek_"))
BOB = r.binding(r.principal("sk-bob", True, "ek_"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def record(gen: int = 0, exp: float = 1_000_300.0, bind: str = ALICE, **extra) -> r.ResumeRecord:
    return r.ResumeRecord(sid="sess_abc", gen=gen, bind=bind, iat=1_000_000.0, exp=exp, replica="a",
                          config={"instructions": "be brief"}, sampling={}, **extra)


def refused(codec: r.HandleCodec, handle: str, bind: str = ALICE) -> ErrorCode:
    with pytest.raises(r.ResumeError) as exc:
        codec.open(handle, bind)
    return exc.value.code


def test_round_trip_on_another_replica_with_the_shared_key():
    clock = Clock()
    sealed = r.HandleCodec([KEY], 300, clock).seal(record(items=[{"id": "item_1", "type": "message"}]))
    opened = r.HandleCodec([KEY], 300, clock).open(sealed, ALICE)
    assert opened.sid == "sess_abc" and opened.items == [{"id": "item_1", "type": "message"}]
    assert "be brief" not in sealed  # encrypted, not only signed


def test_key_rotation_old_handles_still_open():
    clock = Clock()
    sealed = r.HandleCodec(["old"], 300, clock).seal(record())
    assert r.HandleCodec(["new", "old"], 300, clock).open(sealed, ALICE).sid == "sess_abc"
    assert refused(r.HandleCodec(["new"], 300, clock), sealed) is ErrorCode.RESUME_INVALID


def test_forged_and_garbled_handles_are_invalid():
    clock = Clock()
    codec = r.HandleCodec([KEY], 300, clock)
    sealed = codec.seal(record())
    tampered = sealed[:40] + ("A" if sealed[40] != "A" else "B") + sealed[41:]
    assert refused(codec, tampered) is ErrorCode.RESUME_INVALID
    assert refused(codec, "not a handle") is ErrorCode.RESUME_INVALID
    assert refused(codec, "é" * 10) is ErrorCode.RESUME_INVALID
    assert refused(codec, "") is ErrorCode.RESUME_INVALID
    # sealed under another key: a forger who knows the format but not the secret
    assert refused(codec, r.HandleCodec(["guess"], 300, clock).seal(record())) is ErrorCode.RESUME_INVALID


def test_oversized_handle_is_refused_before_decrypting(monkeypatch):
    codec = r.HandleCodec([KEY], 300, Clock())

    def never(*_: object) -> bytes:
        raise AssertionError("decrypted an oversized handle")

    monkeypatch.setattr(codec._fernet, "decrypt", never)
    assert refused(codec, "A" * (r.MAX_HANDLE_CHARS + 1)) is ErrorCode.RESUME_INVALID


def test_compression_bomb_stops_at_the_plaintext_bound():
    key = r._fernet(KEY)
    bomb = key.encrypt(zlib.compress(b" " * (r.MAX_RECORD_BYTES * 4)))
    assert len(bomb) <= r.MAX_HANDLE_CHARS
    codec = r.HandleCodec([KEY], 300, Clock())
    assert refused(codec, bomb.decode()) is ErrorCode.RESUME_INVALID
    assert isinstance(key, Fernet) and base64.urlsafe_b64decode(bomb)  # a real Fernet token, not garbage


def test_expired_handle():
    clock = Clock()
    codec = r.HandleCodec([KEY], 300, clock)
    iat, exp = codec.expiry()
    sealed = codec.seal(record(exp=exp))
    clock.now = exp + 0.001
    assert refused(codec, sealed) is ErrorCode.RESUME_EXPIRED


def test_wrong_credentials():
    codec = r.HandleCodec([KEY], 300, Clock())
    sealed = codec.seal(record())
    assert refused(codec, sealed, BOB) is ErrorCode.RESUME_FORBIDDEN
    anonymous = r.binding(r.principal(None, True, "ek_"))
    assert refused(codec, sealed, anonymous) is ErrorCode.RESUME_FORBIDDEN
    # auth off: everyone is the same principal, whatever they present
    assert r.principal("sk-alice", False, "ek_") == r.principal(None, False, "ek_") == r.ANONYMOUS
    assert r.principal("ek_one", True, "ek_") == r.principal("ek_two", True, "ek_")


def test_replay_cache_single_use_and_rotation():
    clock = Clock()
    cache = r.ReplayCache(10, clock)
    cache.redeem(record(gen=3))
    for gen in (3, 2, 0):  # the same handle again, or an older one of the same session
        with pytest.raises(r.ResumeError) as exc:
            cache.redeem(record(gen=gen))
        assert exc.value.code is ErrorCode.RESUME_REPLAYED
    undo = cache.redeem(record(gen=4))  # the newer handle the resumed session was sent
    undo()  # admission failed after all: the handle can be used again
    cache.redeem(record(gen=4))


def test_replay_cache_is_bounded_and_fails_closed():
    clock = Clock()
    cache = r.ReplayCache(2, clock)
    for sid in ("s1", "s2"):
        cache.redeem(record().model_copy(update={"sid": sid}))
    with pytest.raises(r.ResumeError) as exc:
        cache.redeem(record().model_copy(update={"sid": "s3"}))
    assert exc.value.code is ErrorCode.SERVER_BUSY
    clock.now = 1_000_301.0  # the remembered handles expired: they guard nothing now
    cache.redeem(record(exp=1_000_900.0).model_copy(update={"sid": "s3"}))
    assert len(cache) == 1


def test_resume_errors_close_the_socket_as_policy_violations():
    for code in (ErrorCode.RESUME_INVALID, ErrorCode.RESUME_EXPIRED, ErrorCode.RESUME_REPLAYED,
                 ErrorCode.RESUME_FORBIDDEN):
        assert CLOSE_CODES[code] == 1008


def _session(settings: ServerSettings) -> Session:
    return Session(settings, ByteTokenizer(), 4, 4, on_overflow=lambda: None)


def test_a_session_record_round_trips_into_a_new_session():
    settings = ServerSettings()
    tokenizer = ByteTokenizer()
    old = _session(settings)
    old.client_instructions = "answer in one word"
    old.conversation.add({"id": "item_q", "type": "message", "role": "user", "status": "completed",
                          "content": [{"type": "input_text", "text": "what colour is the sky?"}]})
    old.conversation.add({"id": "item_a", "type": "message", "role": "assistant", "status": "completed",
                          "content": [{"type": "output_audio", "transcript": "blue"}]})
    rec = snapshot(old, ALICE, "replica-a", 0.0, 1e12)
    assert rec.gen == 0 and old.resume_gen == 1
    codec = r.HandleCodec([KEY], 300)
    opened = codec.open(codec.seal(rec), ALICE)
    new = _session(settings)
    restore(new, opened, 64, lambda text: len(tokenizer.encode(text)))
    assert new.id == old.id and new.resume_gen == 1
    assert new.client_instructions == "answer in one word"
    assert new.conversation.get("item_q")["content"][0]["text"] == "what colour is the sky?"
    # the record's tail is pinned after the instructions, within the prefix
    assert new.instructions.startswith("answer in one word\n")
    assert new.instructions.endswith("assistant: blue")
    assert len(tokenizer.encode(new.instructions)) <= 63


def test_a_long_conversation_keeps_its_newest_items_within_the_handle():
    settings = ServerSettings()
    old = _session(settings)
    for i in range(400):
        text = base64.b64encode(bytes(range(256)) * 2).decode() + str(i)  # incompressible-ish text
        old.conversation.add({"id": f"item_{i}", "type": "message", "role": "user", "status": "completed",
                              "content": [{"type": "input_text", "text": text}]})
    codec = r.HandleCodec([KEY], 300)
    handle = codec.seal(snapshot(old, ALICE, "a", 0.0, 1e12))
    assert len(handle) <= r.MAX_HANDLE_CHARS
    items = codec.open(handle, ALICE).items
    assert items and items[-1]["id"] == "item_399"
