"""The demo page talking to the shipped demo model, in Debian's Chromium (headless, Playwright).

`make serve` serves checkpoints/tiny-demo behind this page; here a real server does the same and
the page types a question and shows the model's answer in the transcript. Chromium's fake
microphone plays a quiet noise floor (a speaking fake mic would start its own conversation),
except in the test of what the model heard, where it asks a question.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.realserver import ServerThread, demo_engine, demo_settings

from microturn.model.engine import Engine
from microturn.model.resample import resample
from microturn.training.espeak import speak

CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 25_000  # generous: 2 shared cores run the server, the browser and the fake devices
NOISE_DBFS = -60.0  # the fake microphone's level: a quiet room
# true once a model line of the transcript holds {text}
MODEL_SAID = ("[...document.querySelectorAll('#transcript .model')]"
              ".some(s => s.textContent.includes('{text}'))")
# true once a "you (heard)" line of the transcript matches /{pattern}/
HEARD_WORDS = ("[...document.querySelectorAll('#transcript .heard')]"
               ".some(s => /{pattern}/.test(s.textContent))")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return demo_engine(2)


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:  # one per thread: both browsers come from it
        yield pw


def _chromium(playwright, tmp_path_factory, mic: np.ndarray) -> Iterator[object]:
    """Chromium whose fake microphone loops `mic` (48 kHz)."""
    wav = tmp_path_factory.mktemp("media") / "mic.wav"
    sf.write(wav, mic.astype(np.float32), 48_000, subtype="PCM_16")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required"]
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM), headless=True, args=args
    )
    yield context
    context.close()


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory) -> Iterator[object]:
    room = np.random.default_rng(0).standard_normal(48_000 * 5) * 10 ** (NOISE_DBFS / 20)
    yield from _chromium(playwright, tmp_path_factory, room)


@pytest.fixture
def speaking_browser(playwright, tmp_path_factory) -> Iterator[object]:
    """The fake microphone asks a spoken question (a training voice and wording), then 3 s of room."""
    speech = resample(speak("repeat the word tiger", voice="en-us+m3", speed=155, pitch=45), 16_000, 48_000)
    room = np.random.default_rng(1).standard_normal(48_000 * 3) * 10 ** (NOISE_DBFS / 20)
    yield from _chromium(playwright, tmp_path_factory,
                         np.concatenate([room[:24_000], 0.5 * speech / np.abs(speech).max(), room]))


@contextmanager
def started_page(browser, engine: Engine) -> Iterator[object]:
    """A real server on the demo model and the page, started; on exit: no page or server errors."""
    with ServerThread(demo_settings(2), engine) as srv:
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(srv.http_url + "/")
        page.click("#start")
        yield page
        assert page.evaluate("window.microturnDemo.stats.errors") == [] and problems == []
        page.click("#stop")
        page.close()


def test_typed_question_gets_the_models_answer_in_the_transcript(engine, browser):
    with started_page(browser, engine) as page:
        page.wait_for_function("window.microturnDemo.stats.state === 'live'", timeout=WAIT_MS)
        page.fill("#text", "repeat the word tiger")
        page.click("#say")
        page.wait_for_function(MODEL_SAID.format(text="tiger."), timeout=WAIT_MS)
        assert "you: repeat the word tiger" in page.inner_text("#transcript")


def test_spoken_question_shows_what_the_model_heard(engine, speaking_browser):
    """Microphone in: the page shows the model's reading of the speech as a "you (heard)" line, then
    the model's answer to it."""
    with started_page(speaking_browser, engine) as page:
        # how well it hears is measured by `make eval-demo` (heard_cer); here: the page shows a reading
        # of the speech ("repeat the word tig" or so), then the model's answer
        page.wait_for_function(HEARD_WORDS.format(pattern="peat|tig"), timeout=WAIT_MS)
        page.wait_for_function(MODEL_SAID.format(text="tiger."), timeout=WAIT_MS)
        lines = page.eval_on_selector_all("#transcript > span", "spans => spans.map(s => [s.className, "
                                          "s.textContent])")
    heard = [i for i, (kind, text) in enumerate(lines)
             if kind == "heard" and text.startswith("you (heard): ") and re.search("peat|tig", text)]
    answers = [i for i, (kind, text) in enumerate(lines) if kind == "model" and "tiger." in text]
    assert heard and answers and heard[0] < answers[-1], lines  # the answer follows what it heard
    assert not [text for kind, text in lines if kind == "you"], lines  # spoken, not typed


# Over the page's WebRTC call: the call's microphone track is swapped for a WebAudio one that says
# `window.interruption` (48 kHz samples) when `window.interrupt()` is called.
SPEAK_ON_CUE = """(samples) => {
    const ctx = new AudioContext({ sampleRate: 48000 });
    const dest = ctx.createMediaStreamDestination();
    const sender = window.microturnRealtime.pc.getSenders().find((s) => s.track && s.track.kind === 'audio')
        || window.microturnRealtime.pc.getTransceivers()[0].sender;
    window.interrupt = () => {
        const buffer = ctx.createBuffer(1, samples.length, 48000);
        buffer.copyToChannel(Float32Array.from(samples), 0);
        const source = ctx.createBufferSource();
        source.buffer = buffer;
        source.connect(dest);
        source.start();
    };
    const c = window.microturnRealtime, on = c.handlers.onEvent;
    c.seen = [];
    c.handlers.onEvent = (e) => { c.seen.push(e); on(e); };
    return ctx.resume().then(() => sender.replaceTrack(dest.stream.getAudioTracks()[0]));
}"""
SEEN = "window.microturnRealtime.seen.some((e) => {cond})"
ATTEMPTS = 3


def test_talking_over_a_reply_on_the_webrtc_call_cuts_it_off(engine, browser):
    """Barge-in over the page's default transport: speech sent up the call's track while the model's
    reply plays ends that reply (cancelled, turn_detected), the server flushes the call's outgoing audio
    (output_audio_buffer.cleared), and the page marks the reply cut off."""
    interruption = resample(speak("stop, wait a moment please", voice="en-us+m3", speed=155), 16_000, 48_000)
    with started_page(browser, engine) as page:
        page.wait_for_function("window.microturnDemo.stats.state === 'live'", timeout=WAIT_MS)
        assert page.evaluate("window.microturnRealtime.transport") == "webrtc"
        page.evaluate(SPEAK_ON_CUE, (0.5 * interruption / np.abs(interruption).max()).tolist())
        # the interruption starts at the reply's first words; on a loaded machine the short greeting can
        # end before the speech is detected, and then the next try is made
        for _ in range(ATTEMPTS):
            page.evaluate("window.microturnRealtime.seen = []")
            page.fill("#text", "hello there")
            page.click("#say")
            page.wait_for_function(SEEN.format(cond="e.type === 'response.output_audio_transcript.delta'"),
                                   timeout=WAIT_MS)
            page.evaluate("window.interrupt()")
            page.wait_for_function(SEEN.format(cond="['output_audio_buffer.cleared', "
                                                    "'input_audio_buffer.speech_stopped'].includes(e.type)"),
                                   timeout=WAIT_MS)
            if page.evaluate(SEEN.format(cond="e.type === 'output_audio_buffer.cleared'")):
                break
            page.wait_for_timeout(3_000)  # what the model says to the interruption
        done = page.evaluate("window.microturnRealtime.seen.filter((e) => e.type === 'response.done')"
                             ".map((e) => e.response)")
        cut = [r for r in done if r["status"] == "cancelled"]
        assert cut and cut[0]["status_details"]["reason"] == "turn_detected", done
        page.wait_for_function("document.querySelector('#transcript .model.cut') !== null", timeout=WAIT_MS)
        assert "(cut off)" in page.inner_text("#transcript")
