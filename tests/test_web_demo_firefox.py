"""The demo page in Debian's firefox-esr (headless), driven over Firefox's own WebDriver BiDi, over both
of the page's transports (WebRTC by default, the WebSocket).

Playwright's Firefox and geckodriver are not to be had here, so tests/helpers/bidi.py starts
/usr/bin/firefox-esr with `--remote-debugging-port` on a fresh profile (fake media, autoplay allowed,
no traffic beyond loopback) and speaks BiDi to it over a websocket. A machine without a sound card or
sound server gives Firefox no output device, and then AudioContext.resume() never settles; Firefox's
mock audio backend (media.cubeb.force_mock_context) stands in for one. The fake microphone plays a
20 kHz tone, which the page's resampler to 16 kHz removes (about -100 dBFS left, a silent room: its
default 1 kHz tone is heard as speech), so the model answers only what is typed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.bidi import FIREFOX, Firefox
from helpers.realserver import ServerThread, demo_engine, demo_settings

from microturn.model.engine import Engine

WAIT_S = 25.0  # generous: 2 shared cores run the server, the browser and the fake devices
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# an output device that is always there, and a fake microphone the page hears as silence
AUDIO_PREFS = {"media.cubeb.force_mock_context": True, "media.navigator.audio.fake_frequency": 20_000}
# the page calls the server over WebRTC: Firefox leaves loopback out of ICE unless told, and, as a fake
# device is no permission grant, hides its host addresses behind mDNS names that aiortc cannot resolve
WEBRTC_PREFS = {"media.peerconnection.ice.loopback": True,
                "media.peerconnection.ice.obfuscate_host_addresses": False}
# true once a model line of the transcript holds {text}
MODEL_SAID = ("[...document.querySelectorAll('#transcript .model')]"
              ".some(s => s.textContent.includes('{text}'))")

pytestmark = [
    pytest.mark.skipif(not FIREFOX.exists(), reason="needs Debian's firefox-esr at /usr/bin/firefox-esr"),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return demo_engine(2)


@contextmanager
def page_on_server(engine: Engine, prefs: dict[str, object], query: str = "") -> Iterator[Firefox]:
    """A real server on the demo model and Firefox on its page."""
    with ServerThread(demo_settings(2), engine) as srv, Firefox(prefs) as firefox:
        firefox.goto(f"{srv.http_url}/{query}")
        firefox.wait_for("window.microturnDemo && window.microturnDemo.stats.state === 'idle'", WAIT_S)
        yield firefox


# the remote track's inbound audio energy so far (the model's voice as Firefox received it)
INBOUND_ENERGY = """(async () => {
    const stats = await window.microturnRealtime.pc.getStats();
    for (const s of stats.values())
        if (s.type === 'inbound-rtp' && s.kind === 'audio') return s.totalAudioEnergy || 0;
    return 0;
})()"""


@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_firefox_goes_live_and_shows_the_models_answer_to_a_typed_question(engine, transport):
    """WebRTC, the page's default, and the WebSocket (?transport=websocket): the typed question's answer
    reaches the transcript, and its voice reaches Firefox (the call's remote track, or the worklet)."""
    query = "" if transport == "webrtc" else "?transport=websocket"
    with page_on_server(engine, {**AUDIO_PREFS, **WEBRTC_PREFS}, query) as firefox:
        firefox.click("#start")
        firefox.wait_for("window.microturnDemo.stats.state !== 'connecting'", WAIT_S)
        assert firefox.evaluate("window.microturnDemo.stats.state") == "live", firefox.text("#message")
        assert firefox.evaluate("window.microturnRealtime.transport") == transport, firefox.text("#message")
        firefox.fill("#text", "repeat the word tiger")
        firefox.click("#say")
        firefox.wait_for(MODEL_SAID.format(text="tiger."), WAIT_S)
        if transport == "webrtc":
            deadline = time.monotonic() + WAIT_S
            while firefox.evaluate(INBOUND_ENERGY) <= 0:
                assert time.monotonic() < deadline, "no energy on the call's remote track"
                time.sleep(0.2)
            firefox.wait_for("(window.microturnDemo.stats.rtc || {}).packetsReceived > 0", WAIT_S)
        else:
            firefox.wait_for(
                "window.microturnDemo.stats.player && window.microturnDemo.stats.player.played > 0", WAIT_S
            )
        ARTIFACTS.mkdir(exist_ok=True)
        firefox.screenshot(ARTIFACTS / f"web_demo_firefox_{transport}.png")
        stats = firefox.evaluate("window.microturnDemo.stats")
        transcript = firefox.text("#transcript")
        assert "you: repeat the word tiger" in transcript, transcript
        assert stats["errors"] == [] and stats["missedSeq"] == 0 and stats["micPackets"] > 0, stats
        assert stats["micLevel"] < 1e-3, stats  # the room stayed silent
        assert firefox.text("#message") == ""
        firefox.click("#stop")
        assert firefox.evaluate("window.microturnDemo.stats.state") == "closed"
        assert firefox.problems == []


def test_firefox_says_so_when_audio_cannot_start(engine):
    """Autoplay blocked and Start pressed by a script (no user gesture): resume() is held forever, and
    the page says audio could not start instead of hanging at "connecting"."""
    blocked = {**AUDIO_PREFS, "media.autoplay.default": 1, "media.autoplay.block-webaudio": True}
    with page_on_server(engine, blocked) as firefox:
        firefox.evaluate("document.querySelector('#start').click()")
        firefox.wait_for("window.microturnDemo.stats.state !== 'connecting'", WAIT_S)
        assert firefox.evaluate("window.microturnDemo.stats.state") == "idle"
        message = firefox.text("#message")
        # app.js names the error (TimeoutError); media.js's message says what happened
        assert "audio output" in message.lower(), message
        assert "TimeoutError" in message or " 5 s " in message, message
        assert firefox.evaluate("document.querySelector('#message').hidden") is False
        assert firefox.evaluate("document.querySelector('#start').disabled") is False  # can try again
        assert firefox.problems == []
