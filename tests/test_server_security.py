"""Hardening against hostile or careless clients, as they would hit it: a real server on loopback.

Each test starts the server configuration it needs and attacks it the way a client would:
bad HTTP bodies, credentials in handshakes and logs, a DNS-rebinding page, decompression-bomb
images and unpaced audio floods. One tiny engine is shared by the module's servers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import websockets
from helpers.realserver import ServerThread, collect, warm_engine

from microturn.model.engine import Engine
from microturn.server import connection as server_connection
from microturn.server import media_input
from microturn.server import protocol as p
from microturn.server.auth import Authenticator
from microturn.server.cli import REQUEST_LOGGERS
from microturn.server.media_input import image_size
from microturn.server.settings import ServerSettings

SLOTS = 2
CHROMIUM = Path("/usr/bin/chromium")
KEY = "k-good-0123456789"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return warm_engine(SLOTS)


def _jpeg(width: int = 64, height: int = 48, progressive: bool = False) -> bytes:
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, data = cv2.imencode(".jpg", np.full((height, width, 3), 128, np.uint8), flags)
    assert ok
    return data.tobytes()


def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The same small file with its frame header rewritten to claim width x height (a pixel bomb)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[sof + 9 :]


async def _created(ws) -> None:
    _, events = await collect(ws, 10, until=lambda e: e["type"] == "session.created")
    assert events and events[-1]["type"] == "session.created"


async def _errors(ws, seconds: float = 1.5) -> list[dict]:
    _, events = await collect(ws, seconds)
    return [e["error"] for e in events if e["type"] == "error"]


async def _status(url: str, **kw) -> int:
    with pytest.raises(websockets.InvalidStatus) as err:
        async with websockets.connect(url, **kw):
            pass
    return err.value.response.status_code


# --- 1. client_secrets: auth before the body; a bad body is 400 in the error shape ---

BAD_BODIES = [
    b'{"expires_after": {"seconds": NaN}}',
    b'{"expires_after": {"seconds": Infinity}}',
    b'{"expires_after": {"seconds": 1e999}}',
    b'{"expires_after": {"seconds": -1}}',
    b'{"expires_after": {"seconds": "soon"}}',
    b'{"expires_after": ',
    b"[1, 2]",
    b'"text"',
    b"\xff\xfe\x00",
    b"[" * 100_000,
    b'{"session": {"instructions": 5}}',
]


async def test_client_secrets_checks_auth_before_the_body_and_refuses_bad_bodies_with_400(engine):
    json_type = {"Content-Type": "application/json"}
    with ServerThread(ServerSettings(max_sessions=SLOTS, api_keys=KEY), engine) as srv:
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            for body in BAD_BODIES:
                response = await http.post("/v1/realtime/client_secrets", content=body, headers=json_type)
                assert response.status_code == 401, body
                assert response.json()["error"]["code"] == "unauthorized"
            good = {**json_type, "Authorization": f"Bearer {KEY}"}
            for body in BAD_BODIES:
                response = await http.post("/v1/realtime/client_secrets", content=body, headers=good)
                assert response.status_code == 400, body
                error = response.json()["error"]
                assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
                assert error["message"] and {"param", "event_id"} <= error.keys()
            huge = b'{"x": "' + b"a" * (3 * 1024 * 1024) + b'"}'
            response = await http.post("/v1/realtime/client_secrets", content=huge, headers=good)
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
            for body in (b"", b"null", b'{"expires_after": {"seconds": 30}}'):
                response = await http.post("/v1/realtime/client_secrets", content=body, headers=good)
                assert response.status_code == 200 and response.json()["value"].startswith("ek_")
            assert (await http.get("/healthz")).status_code == 200  # nothing else was hurt
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:  # auth off: still 400
        response = httpx.post(f"{srv.http_url}/v1/realtime/client_secrets", content=BAD_BODIES[0])
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


async def test_a_secrets_session_config_is_checked_at_mint_and_at_connect(engine):
    """Unencodable text never gets a secret; a config this model refuses (it does not transcribe)
    closes that connection with a clear error and 1008, not 1011, and holds no engine row."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with ServerThread(ServerSettings(max_sessions=SLOTS, api_keys=KEY), engine) as srv:
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            body = b'{"session": {"instructions": "bad \\ud800 text"}}'
            response = await http.post("/v1/realtime/client_secrets", content=body, headers=auth)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "session.instructions"
            body = json.dumps({"session": {"audio": {"input": {"transcription": {"model": "any"}}}}})
            minted = await http.post("/v1/realtime/client_secrets", content=body, headers=auth)
            secret = minted.json()["value"]
        async with websockets.connect(f"{srv.ws_url}?client_secret={secret}") as ws:
            events = []
            with pytest.raises(websockets.ConnectionClosedError):  # the server closes: 1008, not 1000
                while True:
                    events.append(json.loads(await ws.recv()))
            assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["invalid_request"]
            assert ws.close_code == 1008
        assert engine.active_slots == []


# --- 2. the credential subprotocol is never echoed ---


async def test_credential_subprotocol_is_not_echoed(engine):
    with ServerThread(ServerSettings(max_sessions=SLOTS, api_keys=KEY), engine) as srv:
        credential = f"openai-insecure-api-key.{KEY}"
        for offered, selected in [
            ([credential], None),
            (["realtime", credential], "realtime"),
            ([credential, "openai-beta.realtime-v1"], "openai-beta.realtime-v1"),
        ]:
            async with websockets.connect(srv.ws_url, subprotocols=offered) as ws:
                assert ws.subprotocol == selected
                assert KEY not in str(ws.response.headers)
                await _created(ws)
        assert await _status(srv.ws_url, subprotocols=["openai-insecure-api-key.wrong"]) == 401


def test_grant_never_carries_the_credential_subprotocol():
    auth = Authenticator(ServerSettings(api_keys=[KEY]))
    assert auth.authorize(None, None, [f"openai-insecure-api-key.{KEY}"]).subprotocol is None
    secret = auth.mint(60, None)["value"]
    grant = auth.authorize(None, None, [f"openai-insecure-api-key.{secret}", "realtime"])
    assert grant.subprotocol == "realtime"


# --- 3. secrets in query strings stay out of the logs ---


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_query_secrets_are_not_logged(engine):
    captured = _Captured()
    settings = ServerSettings(max_sessions=SLOTS, api_keys=KEY)
    with ServerThread(settings, engine, log_level="info") as srv:
        for name in REQUEST_LOGGERS:
            logging.getLogger(name).addHandler(captured)
        try:
            async with httpx.AsyncClient(base_url=srv.http_url) as http:
                assert (await http.get(f"/healthz?api_key={KEY}")).status_code == 200
                auth = {"Authorization": f"Bearer {KEY}"}
                minted = await http.post("/v1/realtime/client_secrets", headers=auth)
                secret = minted.json()["value"]
            assert await _status(f"{srv.ws_url}?client_secret=ek_not-a-real-one") == 401
            async with websockets.connect(f"{srv.ws_url}?audio=binary&client_secret={secret}") as ws:
                await _created(ws)
            await asyncio.sleep(0.2)  # the access line of the last request
        finally:
            for name in REQUEST_LOGGERS:
                logging.getLogger(name).removeHandler(captured)
    logged = "\n".join(captured.lines)
    assert "/healthz" in logged and "WebSocket /v1/realtime" in logged, logged  # the lines were captured
    assert KEY not in logged and secret not in logged and "ek_not-a-real-one" not in logged, logged
    assert "client_secret=[redacted]" in logged and "audio=binary" in logged


# --- 4. same-origin means the server's public origins, not the Host header ---


def _connect_as(srv: ServerThread, host: str, origin: str) -> websockets.connect:
    """What a browser page at `origin` sends when it reached this server by the name `host`."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    return websockets.connect(
        f"ws://{host}:{srv.port}/v1/realtime", sock=sock, origin=origin, open_timeout=10
    )


async def _origin_status(srv: ServerThread, host: str, origin: str) -> int:
    try:
        async with _connect_as(srv, host, origin) as ws:
            await _created(ws)
            return 101
    except websockets.InvalidStatus as err:
        return err.response.status_code


async def test_dns_rebinding_page_is_refused_with_auth_off(engine):
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:
        port = srv.port
        # a rebinding page: its Origin and the Host it sends name the attacker's domain
        assert await _origin_status(srv, "evil.example", f"http://evil.example:{port}") == 403
        assert await _origin_status(srv, "127.0.0.1", f"http://evil.example:{port}") == 403
        assert await _origin_status(srv, "127.0.0.1", f"http://127.0.0.1:{port + 1}") == 403
        assert await _origin_status(srv, "127.0.0.1", f"https://127.0.0.1:{port}") == 403
        for host in ("127.0.0.1", "localhost"):  # the demo page, however it was opened
            assert await _origin_status(srv, host, f"http://{host}:{port}") == 101
        assert await _origin_status(srv, "localhost", f"http://LOCALHOST:{port}/") == 101
    settings = ServerSettings(max_sessions=SLOTS, public_origins="https://talk.example")
    with ServerThread(settings, engine) as srv:
        assert await _origin_status(srv, "talk.example", "https://talk.example") == 101
        assert await _origin_status(srv, "127.0.0.1", f"http://127.0.0.1:{srv.port}") == 403


def test_origin_check_ignores_the_host_header():
    auth = Authenticator(ServerSettings(port=8000))
    assert auth.origin_allowed("http://localhost:8000", ("127.0.0.1", 8000))
    assert auth.origin_allowed("http://[::1]:8000", ("::1", 8000))
    assert auth.origin_allowed("http://127.0.0.1:8000", ("::ffff:127.0.0.1", 8000))
    assert auth.origin_allowed("http://192.168.1.5:8000", ("192.168.1.5", 8000))
    assert not auth.origin_allowed("http://localhost:8000", ("192.168.1.5", 8000))
    assert not auth.origin_allowed("http://evil.example:8000", ("127.0.0.1", 8000))
    assert not auth.origin_allowed("null", ("127.0.0.1", 8000))
    assert auth.origin_allowed("http://localhost:8000", None)  # from the bind host and port
    listed = Authenticator(ServerSettings(allowed_origins="https://app.example", public_origins="https://a.b"))
    assert listed.origin_allowed("https://app.example", ("127.0.0.1", 8000))
    assert listed.origin_allowed("https://a.b:443", ("127.0.0.1", 8000))
    assert not listed.origin_allowed("http://127.0.0.1:8000", ("127.0.0.1", 8000))


# --- 5. images: the pixel count is read from the header before decoding ---


def test_image_size_reads_only_the_header():
    assert image_size(_jpeg()) == (64, 48)
    assert image_size(_jpeg(progressive=True)) == (64, 48)
    ok, png = cv2.imencode(".png", np.zeros((30, 20, 3), np.uint8))
    assert image_size(png.tobytes()) == (20, 30)
    assert image_size(_claiming(_jpeg(), 10_000, 10_000)) == (10_000, 10_000)
    assert image_size(_claiming(_jpeg(), 10_000, 10_000)[:200]) == (10_000, 10_000)  # header only
    comments = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 1000  # a crafted walk: no frame header in reach
    for data in (b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x08", b"GIF89a", comments):
        assert image_size(data) is None


async def test_pixel_bomb_jpeg_is_refused_without_decoding(engine, monkeypatch):
    decoded = []
    imdecode = media_input.cv2.imdecode
    monkeypatch.setattr(media_input.cv2, "imdecode", lambda *a: decoded.append(1) or imdecode(*a))
    bomb = _claiming(_jpeg(), 10_000, 10_000)  # 100 megapixels in a file of a few hundred bytes
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            await _created(ws)
            await ws.send(p.encode_frame(p.KIND_INPUT_JPEG, 7, 0, bomb))
            url = "data:image/jpeg;base64," + base64.b64encode(bomb).decode()
            item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "img1", "item": item}))
            errors = await _errors(ws)
            refused = [(e["code"], e["event_id"]) for e in errors]
            assert refused == [("invalid_image", "frame:7"), ("invalid_image", "img1")]
            assert all("10000x10000" in e["message"] and "max_image_pixels" in e["message"] for e in errors)
            assert not decoded
            await ws.send(p.encode_frame(p.KIND_INPUT_JPEG, 8, 0, _jpeg()))  # the session lives on
            assert not await _errors(ws, 1.0) and decoded
    with ServerThread(ServerSettings(max_sessions=SLOTS, max_image_pixels=64 * 48 - 1), engine) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            await _created(ws)
            await ws.send(p.encode_frame(p.KIND_INPUT_JPEG, 1, 0, _jpeg()))
            assert [e["code"] for e in await _errors(ws)] == ["invalid_image"]


# --- 6. unpaced audio is refused by size before it is decoded ---


async def test_unpaced_audio_is_refused_before_decoding(engine, monkeypatch):
    decoded, appended = [], []
    b64decode, append = server_connection.b64decode, media_input.InputAudioBuffer.append
    monkeypatch.setattr(server_connection, "b64decode", lambda *a: decoded.append(1) or b64decode(*a))
    monkeypatch.setattr(
        media_input.InputAudioBuffer, "append", lambda self, *a: appended.append(1) or append(self, *a)
    )
    flood = np.zeros(24_000 * 30, "<i2").tobytes()  # 30 s at 24 kHz: 1.44 MB of PCM, 1.9 MB as base64
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:
        async with websockets.connect(srv.ws_url) as ws:
            await _created(ws)
            b64 = base64.b64encode(flood[: 1_100_000]).decode()  # ~1.5 MB of base64, 23 s of audio
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": "a1", "audio": b64}))
            errors = await _errors(ws)
            assert [(e["code"], e["event_id"]) for e in errors] == [("input_rate_exceeded", "a1")]
            assert not decoded and not appended
            small = base64.b64encode(np.zeros(2400, "<i2").tobytes()).decode()  # 100 ms: fits
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": "a2", "audio": small}))
            assert not await _errors(ws, 0.5) and decoded and appended
            appended.clear()
            await ws.send(p.encode_frame(p.KIND_INPUT_PCM16, 1, 0, flood, flags=p.FLAG_RATE_24K))
            errors = await _errors(ws)
            assert [(e["code"], e["event_id"]) for e in errors] == [("input_rate_exceeded", "frame:1")]
            assert not appended


def test_size_check_refuses_only_what_the_buffer_would():
    max_ms = 2000
    for rate in p.PCM_RATES:
        for buffered_samples in (0, 1, 15_999, 16_000, 31_999):
            for n_samples in (1, rate // 10, rate * 2 - 1, rate * 2, rate * 2 + 1, rate * 3):
                buffer = media_input.InputAudioBuffer(0, max_ms)
                if buffered_samples:
                    buffer.append(np.zeros(buffered_samples, np.float32), 16_000)
                try:
                    media_input.check_input_ahead(n_samples * 2, rate, buffer.buffered_ms, max_ms)
                except media_input.ProtocolError:
                    with pytest.raises(media_input.ProtocolError):  # the exact check agrees
                        buffer.append(np.zeros(n_samples, np.float32), rate)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_chromium_handshakes_with_the_credential_subprotocol(engine):
    """What browsers do: the demo page's offer works; an offer of the credential alone fails in Chromium.

    Chromium fails a handshake that selects none of the offered subprotocols, and the server
    never selects the credential, so browser clients offer `realtime` with it (the demo page does).
    """
    sync_api = pytest.importorskip("playwright.sync_api")
    credential = f"openai-insecure-api-key.{KEY}"
    script = """([url, protocols]) => new Promise((resolve) => {
        const ws = new WebSocket(url, protocols);
        ws.onmessage = (e) => {
            resolve({protocol: ws.protocol, first: JSON.parse(e.data).type});
            ws.close();
        };
        ws.onclose = (e) => resolve({closed: e.code});
        setTimeout(() => resolve({timeout: true}), 15000);
    })"""
    with ServerThread(ServerSettings(max_sessions=SLOTS, api_keys=KEY), engine) as srv:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                page = browser.new_page()
                page.goto(srv.http_url + "/healthz")  # a page of the server's own origin
                offer = ["realtime", credential]
                got = page.evaluate(script, [srv.ws_url, offer])
                assert got == {"protocol": "realtime", "first": "session.created"}
                assert page.evaluate(script, [srv.ws_url, [credential]]) == {"closed": 1006}
            finally:
                browser.close()
