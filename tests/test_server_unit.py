"""Server pieces without a server: frame codec, event parsing, input chunking and jitter, auth, settings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from microturn.model.slots import TURN_SAMPLES
from microturn.server import protocol as p
from microturn.server import server_events as ev
from microturn.server.auth import Authenticator
from microturn.server.errors import ErrorCode, ProtocolError
from microturn.server.media_input import InputAudioBuffer
from microturn.server.settings import ServerSettings, settings_table


def test_frame_roundtrip_and_rejects():
    payload = b"\x01\x02" * 10
    frame = p.decode_frame(p.encode_frame(p.KIND_INPUT_PCM16, 7, 1400, payload, flags=p.FLAG_RATE_24K))
    assert (frame.kind, frame.flags, frame.seq, frame.pts_ms, frame.payload) == (1, 1, 7, 1400, payload)
    assert p.encode_frame(p.KIND_OUTPUT_PCM16, 1, 200, b"") == bytes.fromhex("81 00 00000001 000000c8")
    for data, code in [
        (b"\x01\x00", ErrorCode.INVALID_FRAME),
        (p.encode_frame(0x7F, 0, 0, b"x"), ErrorCode.INVALID_FRAME),
        (p.encode_frame(p.KIND_OUTPUT_PCM16, 0, 0, b"x"), ErrorCode.INVALID_FRAME),
        (p.encode_frame(p.KIND_INPUT_PCM16, 0, 0, b"xx", flags=0x04), ErrorCode.UNSUPPORTED_SAMPLE_RATE),
    ]:
        with pytest.raises(ProtocolError) as err:
            p.decode_frame(data)
        assert err.value.code == code


@pytest.mark.parametrize(
    ("text", "code", "event_id"),
    [
        ("{oops", ErrorCode.INVALID_JSON, None),
        ('["a"]', ErrorCode.INVALID_JSON, None),
        ('{"event_id": "e1"}', ErrorCode.INVALID_EVENT, "e1"),
        ('{"type": "nope", "event_id": "e2"}', ErrorCode.UNKNOWN_EVENT, "e2"),
        ('{"type": "input_audio_buffer.append", "event_id": "e3"}', ErrorCode.INVALID_EVENT, "e3"),
        (
            '{"type": "input_audio_buffer.append", "audio": 5, "event_id": "e4"}',
            ErrorCode.INVALID_EVENT,
            "e4",
        ),
        ('{"type": "task.cancel", "event_id": "e5", "task_id": []}', ErrorCode.INVALID_EVENT, "e5"),
    ],
)
def test_parse_errors_name_the_event(text, code, event_id):
    with pytest.raises(ProtocolError) as err:
        p.parse_client_event(text)
    assert (err.value.code, err.value.event_id) == (code, event_id)


def test_parse_ga_and_beta_session_update():
    ga = p.parse_client_event(
        '{"type": "session.update", "session": {"type": "realtime", "instructions": "hi", "voice": "x",'
        ' "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}'
    )
    assert ga.session.instructions == "hi" and ga.session.audio.input.format.rate == 16000
    beta = p.parse_client_event('{"type": "session.update", "session": {"input_audio_format": "pcm16"}}')
    assert beta.session.input_audio_format == "pcm16"
    delta = ev.OutputTextDelta(response_id="r", item_id="i", delta="a", seq=0)
    assert '"response.text.delta"' in ev.dump_event(delta, beta=True)
    assert '"response.output_text.delta"' in ev.dump_event(delta)


def _pcm(n: int, start: int = 0) -> np.ndarray:
    return ((np.arange(start, start + n) % 1000) / 1000.0).astype(np.float32)


def test_audio_input_slices_packets_of_any_size_in_order():
    audio = InputAudioBuffer(jitter_ms=100, max_ahead_ms=2000)
    sizes = [7, 333, 1600, 1, 999, 260, 1861, 1339]  # 6400 samples = two turns per round
    sent, pos, taken = [], 0, []
    for _ in range(3):
        for n in sizes:
            sent.append(_pcm(n, pos))
            audio.append(sent[-1], 16_000)
            pos += n
        taken += [audio.take(time.monotonic())[0] for _ in range(2)]
    assert all(t.shape == (TURN_SAMPLES,) for t in taken)
    np.testing.assert_array_equal(np.concatenate(taken), np.concatenate(sent)[: 6 * TURN_SAMPLES])
    assert audio.underruns == 0 and audio.dropped_samples == 0


def test_audio_input_drops_the_audio_of_skipped_ticks():
    audio = InputAudioBuffer(jitter_ms=100, max_ahead_ms=2000)
    audio.append(_pcm(5 * TURN_SAMPLES), 16_000)
    audio.take(time.monotonic())
    audio.skip(2)  # the engine overran two ticks while the audio kept coming
    chunk, _ = audio.take(time.monotonic())
    assert audio.dropped_samples == 2 * TURN_SAMPLES
    np.testing.assert_array_equal(chunk, _pcm(5 * TURN_SAMPLES)[3 * TURN_SAMPLES : 4 * TURN_SAMPLES])


def test_audio_input_waits_for_jitter_then_counts_underruns():
    audio = InputAudioBuffer(jitter_ms=100, max_ahead_ms=2000)
    audio.append(_pcm(TURN_SAMPLES), 16_000)  # one turn, less than turn + jitter: not started yet
    chunk, underrun = audio.take(time.monotonic())
    assert not chunk.any() and not underrun
    audio.append(_pcm(1600), 16_000)  # now turn + jitter: the stream starts
    chunk, underrun = audio.take(time.monotonic())
    assert chunk.any() and not underrun
    chunk, underrun = audio.take(time.monotonic())  # 1600 left, audio still flowing: late
    assert underrun and chunk[:1600].any() and not chunk[1600:].any()
    assert audio.underruns == 1
    audio.append(_pcm(800), 16_000)
    chunk, underrun = audio.take(time.monotonic() + 1.0)  # a quiet second later: the tail, not an underrun
    assert chunk[:800].any() and not underrun and audio.underruns == 1


def test_audio_input_resamples_24k_and_bounds_the_rate():
    audio = InputAudioBuffer(jitter_ms=0, max_ahead_ms=1000)
    audio.append(np.zeros(24_000 // 2, np.float32), 24_000)  # 500 ms
    assert 450 <= audio.buffered_ms <= 500  # the resampler holds back its filter delay
    with pytest.raises(ProtocolError) as err:
        audio.append(np.zeros(24_000, np.float32), 24_000, "e9")
    assert (err.value.code, err.value.event_id) == (ErrorCode.INPUT_RATE_EXCEEDED, "e9")
    with pytest.raises(ProtocolError) as err:
        audio.append(np.zeros(10, np.float32), 44_100)
    assert err.value.code == ErrorCode.UNSUPPORTED_SAMPLE_RATE


def test_client_secrets_are_single_use_and_expire():
    auth = Authenticator(ServerSettings(api_keys=["k1"]))
    assert auth.enabled and auth.authorize(None, None, []) is None
    assert auth.authorize("Bearer k2", None, []) is None
    assert auth.authorize("Bearer k1", None, ["realtime"]).subprotocol == "realtime"
    secret = auth.mint(60, {"instructions": "x"})["value"]
    grant = auth.authorize(None, None, ["realtime", f"openai-insecure-api-key.{secret}"])
    assert grant is not None and grant.session == {"instructions": "x"}
    assert auth.authorize(None, None, [f"openai-insecure-api-key.{secret}"]) is None  # replayed
    short = auth.mint(0.01, None)["value"]
    time.sleep(0.05)
    assert auth.authorize(None, short, []) is None  # expired


def test_origin_allowlist():
    auth = Authenticator(ServerSettings(allowed_origins="https://app.example"))
    local = ("127.0.0.1", 8000)  # the server address a connection arrived on
    assert auth.origin_allowed(None, local)
    assert auth.origin_allowed("http://localhost:8000", local)
    assert auth.origin_allowed("https://app.example", local)
    assert not auth.origin_allowed("https://evil.example", local)


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("MICROTURN_API_KEYS", "a, b")
    monkeypatch.setenv("MICROTURN_MAX_SESSIONS", "3")
    settings = ServerSettings()
    assert settings.api_keys == ["a", "b"] and settings.max_sessions == 3 and settings.auth_enabled
    assert all(f"MICROTURN_{name.upper()}" in settings_table() for name in ServerSettings.model_fields)


def test_readme_lists_every_setting():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert settings_table() in readme
