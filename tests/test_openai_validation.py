"""Every server event, over one recorded session, validates against the installed `openai` package's models.

A real server (the demo checkpoint, background tasks on) and a raw WebSocket client run a
session that exercises each event type: typed text and its spoken response, a text-only
response, speech (espeak-ng) with its user item and transcript, a barge-in, truncate,
delete, retrieve (hit and miss), response.cancel, a client function call chosen by the
background model, a background task, input buffer commit and clear, and a bad event. Each
event is validated in strict mode by `openai.types.realtime.RealtimeServerEvent` (required
fields present, exact types); the test also checks that the recorded types cover every
OpenAI event type the server defines in server/server_events.py, so a new event type
cannot go out unvalidated.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import websockets
from helpers.realserver import ServerThread, demo_engine, demo_settings
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from microturn.model.resample import resample
from microturn.server import server_events as ev
from microturn.training.espeak import speak

ADAPTER: TypeAdapter = TypeAdapter(RealtimeServerEvent)
MICROTURN_ONLY = {"task.created", "task.delta", "task.done", "task.error", "task.cancelled",
                  "session.go_away", "session.resumption_update", "debug.text_in"}
# Sent only on a WebRTC call, where the server plays the audio; test_webrtc.py validates them strictly.
WEBRTC_ONLY = {"output_audio_buffer.started", "output_audio_buffer.stopped"}
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather forecast for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
pytestmark = pytest.mark.timeout(240)


def openai_event_types() -> set[str]:
    """The OpenAI event types server/server_events.py defines (each class's default `type`)."""
    types = {cls.model_fields["type"].default for cls in vars(ev).values()
             if isinstance(cls, type) and issubclass(cls, ev.ServerEvent)}
    return {t for t in types if isinstance(t, str) and t not in MICROTURN_ONLY | WEBRTC_ONLY}


class Recorder:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.events: list[dict] = []

    async def until(self, done, seconds: float = 20.0) -> dict:
        """Read events until `done(event)`; that event."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                message = await asyncio.wait_for(self.ws.recv(), end - time.monotonic())
            except TimeoutError:
                break
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            self.events.append(event)
            if done(event):
                return event
        raise AssertionError(f"not seen in {seconds} s; last: {[e['type'] for e in self.events[-8:]]}")

    async def quiet(self, seconds: float = 10.0) -> None:
        """Until no response is active (the model finished what it was saying)."""
        created = sum(e["type"] == "response.created" for e in self.events)
        done = sum(e["type"] == "response.done" for e in self.events)
        while created > done:
            await self.until(lambda e: e["type"] == "response.done", seconds)
            done += 1

    async def send(self, **event) -> None:
        await self.ws.send(json.dumps(event))


def pcm24(text: str) -> bytes:
    audio = resample(speak(text, voice="en", speed=160, pitch=50, rate=16_000), 16_000, 24_000)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def stream(rec: Recorder, pcm: bytes, seconds_of_silence: float = 1.0) -> None:
    """Real-time 100 ms appends, then silence."""
    pcm += b"\0" * int(48_000 * seconds_of_silence)
    step = 4_800
    for i in range(0, len(pcm), step):
        await rec.send(type="input_audio_buffer.append", audio=base64.b64encode(pcm[i:i + step]).decode())
        await asyncio.sleep(0.1)


def typed(text: str) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


async def run_session(url: str) -> list[dict]:
    async with websockets.connect(url, max_size=None) as ws:
        rec = Recorder(ws)
        await rec.until(lambda e: e["type"] == "session.created")
        await rec.send(type="session.update", session={"tools": [WEATHER], "audio": {"output": {
            "voice": ev.MODEL_VOICE}}})
        await rec.until(lambda e: e["type"] == "session.updated")
        # a typed turn and its spoken response
        await rec.send(**typed("hello there"))
        await rec.send(type="response.create", event_id="rc1", response={"metadata": {"tag": "one"}})
        done = await rec.until(lambda e: e["type"] == "response.done")
        answered = done["response"]["output"][0]["id"]
        await rec.send(type="conversation.item.retrieve", item_id=answered)
        await rec.until(lambda e: e["type"] == "conversation.item.retrieved")
        await rec.send(type="conversation.item.truncate", item_id=answered, content_index=0, audio_end_ms=300)
        await rec.until(lambda e: e["type"] == "conversation.item.truncated")
        await rec.send(type="conversation.item.retrieve", event_id="miss", item_id="item_nope")
        await rec.until(lambda e: e["type"] == "error")
        # speech: the user's item, its transcript
        await stream(rec, pcm24("please say the word coffee"), 2.0)
        await rec.until(lambda e: e["type"] == "conversation.item.input_audio_transcription.completed")
        await rec.quiet()
        # a barge-in: speech over the model's reply
        interruption = pcm24("stop, wait a moment please")
        await rec.send(**typed("hello there"))
        await rec.until(lambda e: e["type"] == "response.created")
        await rec.until(lambda e: e["type"] == "response.output_audio.delta")
        await stream(rec, interruption, 0.5)
        await rec.until(lambda e: e["type"] == "output_audio_buffer.cleared")
        await rec.quiet()
        # response.cancel of a reply
        await rec.send(**typed("please say the word tiger"))
        await rec.send(type="response.create")
        await rec.until(lambda e: e["type"] == "response.output_audio_transcript.delta")
        await rec.send(type="response.cancel")
        await rec.until(lambda e: e["type"] == "response.done" and e["response"]["status"] == "cancelled")
        await rec.send(type="conversation.item.delete", item_id=answered)
        await rec.until(lambda e: e["type"] == "conversation.item.deleted")
        # a background task, then a client function call the background model chooses
        await rec.send(type="task.create", task={"input": "what is 17 times 23?"})
        await rec.until(lambda e: e["type"] == "task.done")
        await rec.send(type="task.create", task={"input": "the weather forecast for Paris"})
        call = await rec.until(lambda e: e["type"] == "response.function_call_arguments.done")
        await rec.send(type="conversation.item.create", item={"type": "function_call_output",
                                                               "call_id": call["call_id"], "output": "sunny"})
        await rec.until(lambda e: e["type"] == "task.done")
        # buffer events, a text-only response
        await rec.send(type="input_audio_buffer.clear")
        await rec.until(lambda e: e["type"] == "input_audio_buffer.cleared")
        await rec.send(type="session.update", session={"output_modalities": ["text"]})
        await rec.until(lambda e: e["type"] == "session.updated")
        await rec.send(**typed("hello there"))
        await rec.send(type="response.create")
        await rec.until(lambda e: e["type"] == "response.output_text.done")
        await rec.until(lambda e: e["type"] == "response.done")
        return rec.events


def test_every_server_event_validates_against_the_openai_models_strictly():
    settings = demo_settings(1)
    with ServerThread(settings, demo_engine(1)) as srv:
        events = asyncio.run(run_session(srv.ws_url))
    failures = []
    for event in events:
        if event["type"] in MICROTURN_ONLY:
            continue
        try:
            ADAPTER.validate_python(event, strict=True)
        except Exception as exc:  # noqa: BLE001 - every failure is collected and shown
            failures.append(f"{event['type']}: {exc}")
    assert not failures, "\n".join(failures[:10])
    missing = openai_event_types() - {e["type"] for e in events}
    assert not missing, f"event types the server defines but this session never produced: {sorted(missing)}"
