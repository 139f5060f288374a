"""The demo page talking to the shipped demo model, in Debian's Chromium (headless, Playwright).

`make serve` serves checkpoints/tiny-demo behind this page; here a real server does the same and
the page types a question and shows the model's answer in the transcript. Chromium's fake
microphone plays a quiet noise floor (a speaking fake mic would start its own conversation).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from realserver import ServerThread, demo_engine, demo_settings

from microturn.model.engine import Engine

CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 25_000  # generous: 2 shared cores run the server, the browser and the fake devices
NOISE_DBFS = -60.0  # the fake microphone's level: a quiet room
# true once a model line of the transcript holds {text}
MODEL_SAID = ("[...document.querySelectorAll('#transcript .model')]"
              ".some(s => s.textContent.includes('{text}'))")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return demo_engine(2)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[object]:
    wav = tmp_path_factory.mktemp("media") / "room.wav"
    noise = np.random.default_rng(0).standard_normal(48_000 * 5) * 10 ** (NOISE_DBFS / 20)
    sf.write(wav, noise.astype(np.float32), 48_000, subtype="PCM_16")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM), headless=True, args=args
        )
        yield context
        context.close()


def test_typed_question_gets_the_models_answer_in_the_transcript(engine, browser):
    with ServerThread(demo_settings(2), engine) as srv:
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(srv.http_url + "/")
        page.click("#start")
        page.wait_for_function("window.microturnDemo.stats.state === 'live'", timeout=WAIT_MS)
        page.fill("#text", "repeat the word tiger")
        page.click("#say")
        page.wait_for_function(MODEL_SAID.format(text="tiger."), timeout=WAIT_MS)
        assert "you: repeat the word tiger" in page.inner_text("#transcript")
        assert page.evaluate("window.microturnDemo.stats.errors") == [] and problems == []
        page.click("#stop")
        page.close()
