"""The shipped demo checkpoint (checkpoints/tiny-demo): it loads, it is small, and through a real
server (uvicorn on loopback, a real WebSocket client) it answers typed questions with the text
the training data teaches. The questions are training phrasings; held-out behaviour is measured
by `make eval-demo`, not asserted here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from realserver import ServerThread, collect

from microturn.model.checkpoint import WEIGHTS_FILE, read_config
from microturn.model.engine import Engine
from microturn.server.settings import ServerSettings

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-demo"
MAX_SHIPPED_BYTES = 40 * 2**20  # the repo carries the weights: keep them small
ANSWER_WAIT_S = 12.0  # typed question (~6 micro-turns) + answer, with room for a loaded machine


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.from_checkpoint(DEMO, max_slots=2, device="cpu")
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    with ServerThread(ServerSettings(max_sessions=2, checkpoint=str(DEMO)), engine) as srv:
        yield srv


def test_shipped_checkpoint_is_small_and_describes_its_training() -> None:
    config, extra = read_config(DEMO)
    assert (DEMO / WEIGHTS_FILE).stat().st_size <= MAX_SHIPPED_BYTES
    assert extra["stored_dtype"] == "bfloat16" and extra["recipe"]["preset"] == "tiny"
    assert extra["step"] == extra["recipe"]["steps"]
    assert (DEMO / "loss.png").is_file()


async def ask(server: ServerThread, question: str, done) -> tuple[str, list[dict]]:
    """Type `question`; the model's text and every event until `done(text, event)` or the wait ends."""
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
        text = ""

        def until(event: dict) -> bool:
            nonlocal text
            if event["type"] == "response.output_text.delta":
                text += event["delta"]
            return done(text, event)

        _, events = await collect(ws, ANSWER_WAIT_S, until=until)
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
