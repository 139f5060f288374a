"""pipecat's `OpenAIRealtimeLLMService` as a client of a real microturn server (demo model, loopback).

The service runs in a real `Pipeline` (base_url pointed at microturn), as an app builds it; frames
are observed by a processor behind it. Typed and spoken turns, an interruption with its truncate,
and a registered function called with its arguments. Speech is espeak-ng made at test time; a
tool call is scripted through the real model path (`Session.script_text_out`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from helpers.frameworks import (
    ANSWER_WORD,
    API_KEY,
    BARGE_IN_TEXT,
    MARKS,
    RATE,
    TOOL_CITY,
    TOOL_NAME,
    TOOL_PARAMETERS,
    TOOL_RESULT,
    TYPED_QUESTION,
    WAIT_S,
    FrameworkServer,
    event_types,
    not_doubled,
    speech_pcm,
    stream_realtime,
    truncated,
    until,
)
from pipecat.services.openai.realtime import llm as pipecat_llm

pytestmark = MARKS
pytest_plugins = ["helpers.framework_fixtures"]  # engine, hello_pcm


class PipecatApp:
    """A pipecat pipeline [up recorder, OpenAIRealtimeLLMService, down recorder], run by a WorkerRunner;
    records frames both ways, the raw server events the service parsed and the client events it sent."""

    def __init__(self, service: Any) -> None:
        from pipecat.frames.frames import Frame
        from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

        class Recorder(FrameProcessor):
            def __init__(self, direction: FrameDirection) -> None:
                super().__init__()
                self.frames: list[Frame] = []
                self._direction = direction

            async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
                await super().process_frame(frame, direction)
                if direction == self._direction:
                    self.frames.append(frame)
                await self.push_frame(frame, direction)

        self.service = service
        self.up_recorder = Recorder(FrameDirection.UPSTREAM)
        self.down_recorder = Recorder(FrameDirection.DOWNSTREAM)
        self.sent: list[dict] = []
        self.server: list[dict] = []
        self.items_added: list[Any] = []
        send = service.send_client_event

        async def recording_send(event: Any) -> None:
            self.sent.append(event.model_dump(exclude_none=True))
            await send(event)

        service.send_client_event = recording_send

        @service.event_handler("on_conversation_item_created")
        async def _on_item(_service: Any, _item_id: str, item: Any) -> None:
            self.items_added.append(item)

    @property
    def up(self) -> list[Any]:
        return self.up_recorder.frames

    @property
    def down(self) -> list[Any]:
        return self.down_recorder.frames

    def down_of(self, cls: type) -> list[Any]:
        return [f for f in self.down if isinstance(f, cls)]

    def up_of(self, cls: type) -> list[Any]:
        return [f for f in self.up if isinstance(f, cls)]

    def sent_of(self, kind: str) -> list[dict]:
        return [e for e in self.sent if e["type"] == kind]

    def server_of(self, kind: str) -> list[dict]:
        return [e for e in self.server if e.get("type") == kind]

    def errors(self) -> list[Any]:
        from pipecat.frames.frames import ErrorFrame

        return [f for f in self.up + self.down if isinstance(f, ErrorFrame)]

    def diagnose(self) -> str:
        frames = [type(f).__name__ for f in self.down if type(f).__name__ != "TTSAudioRawFrame"]
        return (f"{event_types(self.server)}\nerror frames: {[str(f)[:300] for f in self.errors()]}"
                f"\nsent: {[e['type'] for e in self.sent]}\ndown frames: {frames[-40:]}"
                f"\nup frames: {[type(f).__name__ for f in self.up][-20:]}")

    def alive(self) -> None:
        task = self.service._receive_task
        assert not self.errors(), self.diagnose()
        assert task is not None and not task.done(), "pipecat's receive loop ended\n" + self.diagnose()


@asynccontextmanager
async def pipecat_app(srv: FrameworkServer, monkeypatch: pytest.MonkeyPatch,
                      transcription: bool = False) -> AsyncIterator[tuple[PipecatApp, Any]]:
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.services.openai.realtime import events
    from pipecat.workers.runner import WorkerRunner

    recorded: list[dict] = []
    parse = events.parse_server_event

    def recording_parse(message: str) -> Any:
        recorded.append(json.loads(message))
        return parse(message)

    monkeypatch.setattr(events, "parse_server_event", recording_parse)
    audio_in = events.AudioInput(transcription=events.InputAudioTranscription()) if transcription else None
    settings = pipecat_llm.OpenAIRealtimeLLMService.Settings(
        system_instruction="Be brief.",
        session_properties=events.SessionProperties(audio=events.AudioConfiguration(input=audio_in)),
    )
    service = pipecat_llm.OpenAIRealtimeLLMService(api_key=API_KEY, base_url=srv.ws_url, settings=settings)
    app = PipecatApp(service)
    app.server = recorded
    worker = PipelineWorker(Pipeline([app.up_recorder, service, app.down_recorder]),
                            params=PipelineParams(), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    try:
        await until(lambda: app.server_of("session.updated"), 15, "session.updated", app.diagnose)
        yield app, worker
    finally:
        await worker.cancel()
        with suppress(BaseException):
            await asyncio.wait_for(run, 10)


def _context(text: str | None = None, tools: bool = False) -> Any:
    from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
    from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
    from pipecat.processors.aggregators.llm_context import LLMContext

    schema = ToolsSchema(standard_tools=[FunctionSchema(
        name=TOOL_NAME, description="The weather in a city.", properties=TOOL_PARAMETERS["properties"],
        required=TOOL_PARAMETERS["required"])]) if tools else None
    messages = [{"role": "user", "content": text}] if text else []
    return LLMContext(messages=messages, tools=schema) if schema else LLMContext(messages=messages)


def _spoken_text(app: PipecatApp, since: int = 0) -> str:
    from pipecat.frames.frames import TTSTextFrame

    return "".join(f.text for f in app.down[since:] if isinstance(f, TTSTextFrame))


async def test_pipecat_typed_turn_produces_text_and_audio_frames(engine, monkeypatch):
    """An LLMContextFrame with a user message: the service sends it as conversation.item.create and
    asks for a response; the reply comes down the pipeline as LLMFullResponseStart, TTSStarted,
    TTSAudioRaw (24 kHz), TTSText frames of the transcript, TTSStopped, LLMFullResponseEnd."""
    from pipecat.frames.frames import (
        LLMContextFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )

    with FrameworkServer(engine) as srv:
        async with pipecat_app(srv, monkeypatch) as (app, worker):
            await worker.queue_frame(LLMContextFrame(_context(TYPED_QUESTION)))
            await until(lambda: app.down_of(TTSStoppedFrame) and app.down_of(LLMFullResponseEndFrame), WAIT_S,
                        "the reply's TTSStoppedFrame and LLMFullResponseEndFrame (response.done)",
                        app.diagnose)
            app.alive()
            text = _spoken_text(app)
            assert ANSWER_WORD in text.lower() and not_doubled(text), (text, app.diagnose())
            audio = app.down_of(TTSAudioRawFrame)
            assert audio and all(f.sample_rate == RATE for f in audio)
            assert sum(len(f.audio) for f in audio) >= RATE // 5 * 2
            kinds = [type(f) for f in app.down]
            first = kinds.index
            assert first(LLMFullResponseStartFrame) < first(TTSStartedFrame) < first(TTSAudioRawFrame)
            assert kinds.index(TTSAudioRawFrame) < kinds.index(TTSStoppedFrame)
            # text deltas in an audio session would come as extra LLMTextFrames that go into the context
            assert not [f for f in app.down_of(LLMTextFrame) if f.append_to_context], app.diagnose()
            created = app.sent_of("conversation.item.create")
            assert created and created[0]["item"]["content"][0]["text"] == TYPED_QUESTION


async def test_pipecat_spoken_turn_gets_a_transcription_frame(engine, monkeypatch, hello_pcm):
    """InputAudioRawFrame (16 kHz in, resampled by the service to 24 kHz): the server's VAD events
    become ProposedUser{Started,Stopped}SpeakingFrame, and the completed input transcription comes back
    upstream as a TranscriptionFrame with the text."""
    from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame

    with FrameworkServer(engine) as srv:
        async with pipecat_app(srv, monkeypatch, transcription=True) as (app, worker):
            audio16 = speech_pcm(BARGE_IN_TEXT, rate=16_000)
            await stream_realtime(lambda c: worker.queue_frame(InputAudioRawFrame(c, 16_000, 1)), audio16,
                                  rate=16_000)
            frames = await until(lambda: [f for f in app.up_of(TranscriptionFrame) if f.text.strip()], WAIT_S,
                                 "a TranscriptionFrame (input_audio_transcription.completed)", app.diagnose)
            app.alive()
            assert frames[0].text.strip()
            assert app.server_of("input_audio_buffer.speech_started"), app.diagnose()
            appended = sum(len(e["audio"]) for e in app.sent_of("input_audio_buffer.append")) * 3 // 4
            assert appended >= len(audio16) * 3 // 2 * 9 // 10  # resampled to 24 kHz on the way


async def test_pipecat_barge_in_truncates_the_playing_item(engine, monkeypatch, hello_pcm):
    """Speech while the reply plays: input_audio_buffer.speech_started makes the service send
    conversation.item.truncate for the item of the audio it was playing; the server confirms, the
    connection lives (no ErrorFrame: an `error` would end pipecat's receive loop) and the truncated
    item can be retrieved (conversation.item.retrieve)."""
    from pipecat.frames.frames import InputAudioRawFrame, LLMContextFrame, TTSAudioRawFrame

    with FrameworkServer(engine) as srv:
        async with pipecat_app(srv, monkeypatch) as (app, worker):
            await worker.queue_frame(LLMContextFrame(_context(TYPED_QUESTION)))
            await until(lambda: app.down_of(TTSAudioRawFrame), WAIT_S, "the reply's first audio",
                        app.diagnose)
            playing = app.service._current_audio_response.item_id
            await stream_realtime(lambda c: worker.queue_frame(InputAudioRawFrame(c, RATE, 1)),
                                  hello_pcm[RATE * 3 // 5:])
            truncates = await until(lambda: app.sent_of("conversation.item.truncate"), 15,
                                    "conversation.item.truncate from the service", app.diagnose)
            assert truncates[0]["item_id"] == playing and truncates[0]["audio_end_ms"] >= 0
            await until(lambda: truncated(app, playing), 10, "conversation.item.truncated", app.diagnose)
            item = await asyncio.wait_for(app.service.retrieve_conversation_item(playing), 10)
            assert item.id == playing and item.role == "assistant"
            app.alive()


async def test_pipecat_function_call_invokes_the_registered_handler(engine, monkeypatch):
    """register_function + the tool in the context: the server's call (conversation.item.added of a
    function_call item, then response.function_call_arguments.done) runs the handler with the
    arguments; its result goes back as a function_call_output item the server adds."""
    from pipecat.frames.frames import LLMContextFrame

    calls: list[dict] = []

    async def get_weather(params: Any) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback({"forecast": TOOL_RESULT})

    with FrameworkServer(engine) as srv:
        async with pipecat_app(srv, monkeypatch) as (app, worker):
            app.service.register_function(TOOL_NAME, get_weather)
            await worker.queue_frame(LLMContextFrame(_context(tools=True)))
            await until(lambda: [u for u in app.sent_of("session.update") if u["session"].get("tools")], 10,
                        "the tools in session.update", app.diagnose)
            await asyncio.sleep(0.5)
            await srv.script_tool_call()
            await until(lambda: calls, WAIT_S, f"the registered {TOOL_NAME} handler to run", app.diagnose)
            assert calls == [{"city": TOOL_CITY}]
            outputs = await until(lambda: [e for e in app.sent_of("conversation.item.create")
                                           if e["item"]["type"] == "function_call_output"], 10,
                                  "function_call_output from the service", app.diagnose)
            call_id = outputs[0]["item"]["call_id"]
            assert json.loads(outputs[0]["item"]["output"]) == {"forecast": TOOL_RESULT}
            await until(lambda: [i for i in app.items_added if i.type == "function_call_output"
                                 and i.call_id == call_id], 10, "conversation.item.added of the output",
                        app.diagnose)
            app.alive()
