"""The shipped demo checkpoint (checkpoints/tiny-demo): it loads, it is small, and through a real
server (uvicorn on loopback, a real WebSocket client) it answers typed questions with the text
the training data teaches. The questions are training phrasings; held-out behaviour is measured
by `make eval-demo`, not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import websockets
from helpers.realserver import (
    DEMO_CHECKPOINT,
    ServerThread,
    collect,
    demo_engine,
    demo_settings,
    stream_binary,
)

from microturn.model.checkpoint import WEIGHTS_FILE, read_config
from microturn.model.engine import Engine
from microturn.training.espeak import speak

MAX_SHIPPED_BYTES = 40 * 2**20  # the repo carries the weights: keep them small
ANSWER_WAIT_S = 12.0  # typed question (~6 micro-turns) + answer, with room for a loaded machine
RESULT_WAIT_S = 20.0  # + the background task and the spoken result
SPEECH_WAIT_S = 8.0  # after the spoken question has been streamed: the answer and the transcript


@pytest.fixture(scope="module")
def engine() -> Engine:
    return demo_engine(2)


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    with ServerThread(demo_settings(2).model_copy(update={"task_events": True}), engine) as srv:
        yield srv


def test_shipped_checkpoint_is_small_and_describes_its_training() -> None:
    config, extra = read_config(DEMO_CHECKPOINT)
    assert (DEMO_CHECKPOINT / WEIGHTS_FILE).stat().st_size <= MAX_SHIPPED_BYTES
    assert extra["stored_dtype"] == "bfloat16" and extra["recipe"]["preset"] == "tiny"
    assert extra["step"] == extra["recipe"]["steps"]
    assert (DEMO_CHECKPOINT / "loss.png").is_file()


async def ask(
    server: ServerThread, question: str, done: Callable[[str, dict], bool], wait_s: float = ANSWER_WAIT_S
) -> tuple[str, list[dict]]:
    """Type `question`; the model's text and every event until `done(text, event)` or the wait ends."""
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
        text = ""

        def until(event: dict) -> bool:
            nonlocal text
            if event["type"] == "response.output_audio_transcript.delta":
                text += event["delta"]
            return done(text, event)

        _, events = await collect(ws, wait_s, until=until)
    assert not [e for e in events if e["type"] == "error"]
    return text, events


@pytest.mark.parametrize(("question", "answer"), [
    ("repeat the word tiger", "tiger."),
    ("hello", "hello! how can I help you?"),
])
async def test_server_answers_a_typed_question(server: ServerThread, question: str, answer: str) -> None:
    text, _ = await ask(server, question, lambda text, _: answer in text)
    assert answer in text, f"asked {question!r}, the model wrote {text!r}"


async def test_model_delegates_the_time_to_the_background(server: ServerThread) -> None:
    text, events = await ask(server, "what time is it", lambda _, event: event["type"] == "task.created")
    assert text.startswith("one moment."), text
    created = [e for e in events if e["type"] == "task.created"]
    assert created and created[0]["task"]["origin"] == "model"
    assert created[0]["task"]["input"] == "what time is it"


async def test_model_speaks_the_background_result_of_a_hard_sum(server: ServerThread) -> None:
    """Delegation round trip: holding phrase and task marker, the calculator runs in the background,
    its output enters text-in, the model says it. (How well the model copies the operands into the
    task is measured by `make eval-demo`, not asserted here.)"""
    def spoken_result(text: str, _: dict) -> bool:
        return text.count(".") >= 2 and text.endswith(".")

    text, events = await ask(server, "what is 499 times 34", spoken_result, RESULT_WAIT_S)
    done = [e for e in events if e["type"] == "task.done"]
    assert done and done[0]["result"]["tool"] == "calculator", events
    assert text.startswith("one moment."), text
    assert text.endswith(f"it is {done[0]['result']['output']}."), text


async def test_server_transcribes_and_answers_a_spoken_question(server: ServerThread) -> None:
    """Speech in, in real time: the model's reading of its audio-in comes back as transcription
    events of the speech item, and it answers in text. A training voice and phrasing: held-out
    ones are measured by `make eval-demo` (heard_cer, answer accuracy), not asserted here."""
    speech = speak("repeat the word tiger", voice="en-us+m3", speed=155, pitch=45, rate=16_000)
    quiet = np.zeros(8_000, np.float32)
    audio = np.concatenate([quiet, 0.5 * speech / np.abs(speech).max(), quiet, quiet, quiet, quiet])
    state = {"answer": "", "transcript": None}

    def until(event: dict) -> bool:
        if event["type"] == "response.output_audio_transcript.delta":
            state["answer"] += event["delta"]
        if event["type"] == "conversation.item.input_audio_transcription.completed":
            state["transcript"] = event
        return "tiger." in state["answer"] and state["transcript"] is not None

    async with websockets.connect(server.ws_url + "?audio=binary") as ws:
        sender = asyncio.create_task(stream_binary(ws, audio, 16_000))
        _, events = await collect(ws, len(audio) / 16_000 + SPEECH_WAIT_S, until=until)
        sender.cancel()
    assert not [e for e in events if e["type"] == "error"]
    started = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
    done = state["transcript"]
    # the reading is rough (heard_cer in `make eval-demo`): "repeat the word tig" and the like
    assert done is not None and re.search("peat|tig", done["transcript"]), [e["delta"] for e in deltas]
    assert done["item_id"] in started and {e["item_id"] for e in deltas} == {done["item_id"]}
    assert "tiger." in state["answer"], state["answer"]
