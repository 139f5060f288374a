"""Real voice-agent frameworks as clients of a real microturn server (the shipped demo model, loopback).

Each framework's own OpenAI Realtime client is used unmodified, the way an app uses it:
openai-agents (`RealtimeAgent` + `RealtimeRunner`, url pointed at microturn), pipecat
(`OpenAIRealtimeLLMService` in a `Pipeline`) and livekit-agents (`livekit.plugins.openai.realtime.
RealtimeModel(base_url=...).session()`, headless: no room is needed for the realtime session).
Speech is espeak-ng made at test time and sent in real time. The assertions are on what the app
observed (history, frames, streams, its tool being called), and on the client events the framework
sent (truncate on barge-in, function_call_output), not only that nothing raised. Where the
model's choice must be deterministic (a tool call) the test scripts the model's text-out through
the real model path (`Session.script_text_out`), as tests/test_tasks_e2e.py does.

The wire contract these tests hold the server to is summarised per framework in the report of the
change that added them; in short: one response per utterance with the full GA lifecycle,
`response.created` echoing `response.metadata`, audio transcript deltas only (no text deltas) in
audio sessions, `conversation.item.input_audio_transcription.completed` with `usage`, function calls
as `function_call` output items (`conversation.item.added`, `response.function_call_arguments.done`,
`response.output_item.done` with status completed), and no `error` for what the frameworks send.
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
    RATE,
    TOOL_CITY,
    TOOL_NAME,
    TOOL_PARAMETERS,
    TOOL_RESULT,
    TYPED_QUESTION,
    FrameworkServer,
    errors_of,
    event_types,
    speech_pcm,
    stream_realtime,
    until,
)
from helpers.realserver import demo_engine

from microturn.model.engine import Engine

pytestmark = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WAIT_S = 30.0  # generous: 2 shared cores run the server, the engine and the framework
BARGE_IN_TEXT = "hello there"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return demo_engine(2)


@pytest.fixture(scope="module")
def hello_pcm() -> bytes:
    return speech_pcm(BARGE_IN_TEXT)


def _truncated(app: Any, item_id: str) -> list[dict]:
    """The server's conversation.item.truncated events for `item_id`."""
    return [e for e in app.server_of("conversation.item.truncated") if e["item_id"] == item_id]


def _not_doubled(text: str) -> bool:
    """False for "tigetiger."-style doubling (the same deltas counted twice) or a repeated answer."""
    t = text.strip()
    half = len(t) // 2
    return bool(t) and not (len(t) % 2 == 0 and t[:half] == t[half:]) and t.count(ANSWER_WORD) <= 1


# ============================================================================ openai-agents
agents_realtime = pytest.importorskip("agents.realtime")


class AgentsApp:
    """An openai-agents realtime app: pumps the session's events, keeps the history it shows, records
    the raw server events and every client event the SDK sent."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.events: list[Any] = []  # session events other than raw ones
        self.server: list[dict] = []  # raw server events, as received
        self.sent: list[dict] = []  # client events, as sent
        self.errors: list[Any] = []  # RealtimeError events: `error`, or a server event the SDK refused
        self.history: list[Any] = []
        self.exception: BaseException | None = None
        model = session.model
        send = model._send_raw_message

        async def recording_send(event: Any) -> None:
            self.sent.append(json.loads(event.model_dump_json(exclude_unset=True)))
            await send(event)

        model._send_raw_message = recording_send  # what goes on the wire, in order
        self._pump: asyncio.Task | None = None

    async def _run(self) -> None:
        try:
            async for ev in self.session:
                if ev.type == "raw_model_event":
                    if ev.data.type == "raw_server_event":
                        self.server.append(ev.data.data)
                    continue
                self.events.append(ev)
                if ev.type == "error":
                    self.errors.append(ev.error)
                elif ev.type == "history_updated":
                    self.history = list(ev.history)
                elif ev.type == "history_added":
                    ids = [i.item_id for i in self.history]
                    if ev.item.item_id in ids:
                        self.history[ids.index(ev.item.item_id)] = ev.item
                    else:
                        self.history.append(ev.item)
        except Exception as exc:  # the SDK raises a handler failure (or a lost socket) out of the iterator
            self.exception = exc

    def of_type(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]

    def sent_of(self, kind: str) -> list[dict]:
        return [e for e in self.sent if e["type"] == kind]

    def server_of(self, kind: str) -> list[dict]:
        return [e for e in self.server if e.get("type") == kind]

    def diagnose(self) -> str:
        return (f"{event_types(self.server)}\napp errors: {[str(e)[:300] for e in self.errors]}"
                f"\nexception: {self.exception!r}\nsent: {[e['type'] for e in self.sent]}")

    def alive(self) -> None:
        assert self.exception is None, self.diagnose()
        ended = self._pump is None or self._pump.done()
        assert not ended, "the session's event stream ended\n" + self.diagnose()

    def contract_errors(self) -> list[Any]:
        """The app's errors less those for microturn's own `task.*` events (the SDK validates every server
        event against the GA union, so an extension event is an error there: its own test covers that)."""
        return [e for e in self.errors if not _is_extension_event_error(e)]

    def assistant_items(self) -> list[Any]:
        return [i for i in self.history if i.type == "message" and i.role == "assistant"]

    @staticmethod
    def transcript(item: Any) -> str:
        return "".join(getattr(c, "transcript", None) or getattr(c, "text", None) or "" for c in item.content)


def _is_extension_event_error(error: Any) -> bool:
    text = str(error)
    return "union_tag_invalid" in text and any(f"'{kind}" in text for kind in ("task.", "debug."))


@asynccontextmanager
async def agents_app(srv: FrameworkServer, tools: list | None = None) -> AsyncIterator[AgentsApp]:
    agent = agents_realtime.RealtimeAgent(name="assistant", instructions="Be brief.", tools=tools or [])
    runner = agents_realtime.RealtimeRunner(agent)
    session = await runner.run(model_config={"url": srv.ws_url, "api_key": API_KEY})
    app = AgentsApp(session)
    async with session:
        app._pump = asyncio.create_task(app._run())
        await until(lambda: app.server_of("session.updated"), 10, "session.updated", app.diagnose)
        try:
            yield app
        finally:
            app._pump.cancel()
            with suppress(BaseException):
                await app._pump


async def _agents_typed_reply(app: AgentsApp, question: str = TYPED_QUESTION) -> tuple[Any, str]:
    """Send a typed user turn; the assistant history item the reply went into, once its response is done."""
    before = {i.item_id for i in app.assistant_items()}
    ended_before = len(app.of_type("agent_end"))
    await app.session.send_message(question)

    def replied() -> Any:
        new = [i for i in app.assistant_items() if i.item_id not in before and app.transcript(i).strip()]
        return new and len(app.of_type("agent_end")) > ended_before and new[-1]

    item = await until(replied, WAIT_S, "an assistant reply (a history item with a transcript, then "
                       "response.done)", app.diagnose)
    return item, app.transcript(item)


async def test_agents_typed_turn_gets_one_reply_not_doubled(engine):
    """send_message -> conversation.item.create + response.create; the reply is one response whose
    transcript (the SDK's accumulation of the deltas) reads once: no response.output_text.delta beside
    the audio transcript deltas in an audio session, which the SDK would add to the same transcript."""
    with FrameworkServer(engine) as srv:
        async with agents_app(srv) as app:
            item, transcript = await _agents_typed_reply(app)
            app.alive()
            assert app.sent_of("response.create"), app.diagnose()
            deltas = [e["delta"] for e in app.server_of("response.output_audio_transcript.delta")
                      if e["item_id"] == item.item_id]
            assert ANSWER_WORD in transcript.lower(), (transcript, app.diagnose())
            assert _not_doubled(transcript) and transcript == "".join(deltas), (transcript, deltas)
            assert not app.server_of("response.output_text.delta"), "text deltas in an audio session"
            audio = [e for e in app.of_type("audio") if e.item_id == item.item_id]
            assert audio and sum(len(e.audio.data) for e in audio) >= RATE // 5 * 2, "no reply audio"
            # the reply's response: created (a fresh id), its deltas, done - in that order
            rid = next(e["response_id"] for e in app.server if e.get("item_id") == item.item_id
                       and e["type"] == "response.output_audio.delta")
            order = [e["type"] for e in app.server if e.get("response_id") == rid
                     or (e.get("response") or {}).get("id") == rid]
            assert order[0] == "response.created" and order[-1] == "response.done", order
            assert [e["response"]["id"] for e in app.server_of("response.created")].count(rid) == 1
            assert not app.errors, app.diagnose()


async def test_agents_spoken_turn_reaches_history_with_transcript(engine, hello_pcm):
    """send_audio (24 kHz PCM16, real time) -> the user's speech is a user item of the app's history
    (conversation.item.added with an input_audio part) whose transcript the server completed
    (conversation.item.input_audio_transcription.completed, which the SDK validates with `usage`)."""
    with FrameworkServer(engine) as srv:
        async with agents_app(srv) as app:
            await stream_realtime(app.session.send_audio, hello_pcm)

            def heard() -> Any:
                return [i for i in app.history if i.type == "message" and i.role == "user"
                        and any(c.type == "input_audio" and (c.transcript or "").strip() for c in i.content)]

            users = await until(heard, WAIT_S, "a spoken user item with a transcript in the history",
                                app.diagnose)
            app.alive()
            assert app.server_of("input_audio_buffer.speech_started"), app.diagnose()
            completed = app.server_of("conversation.item.input_audio_transcription.completed")
            assert completed and completed[0]["item_id"] == users[0].item_id
            assert not app.errors, app.diagnose()


async def test_agents_barge_in_sends_truncate_and_session_lives(engine, hello_pcm):
    """Speech while the model speaks: speech_started reaches the SDK while the reply is still its
    ongoing response, so it stops playback (audio_interrupted) and sends conversation.item.truncate for
    the item it was playing; the server confirms; the session then takes another typed turn."""
    with FrameworkServer(engine) as srv:
        async with agents_app(srv) as app:
            await app.session.send_message(TYPED_QUESTION)
            first = await until(lambda: app.of_type("audio"), WAIT_S, "the reply's first audio", app.diagnose)
            playing = first[0].item_id
            talk = asyncio.create_task(stream_realtime(app.session.send_audio, hello_pcm[RATE * 3 // 5:]))
            truncates = await until(lambda: app.sent_of("conversation.item.truncate"), 15,
                                    "conversation.item.truncate from the SDK", app.diagnose)
            await talk
            assert truncates[0]["item_id"] == playing and truncates[0]["content_index"] == 0
            assert 0 <= truncates[0]["audio_end_ms"] <= 30_000
            assert [e for e in app.of_type("audio_interrupted") if e.item_id == playing]
            await until(lambda: _truncated(app, playing), 10, "conversation.item.truncated", app.diagnose)
            app.alive()
            # the interrupted response ends (cancelled), and the session lives on: another typed turn
            await until(lambda: app.of_type("agent_end"), 15, "the interrupted response's response.done",
                        app.diagnose)
            _, transcript = await _agents_typed_reply(app)
            assert transcript.strip()
            app.alive()
            assert not app.errors, app.diagnose()


async def test_agents_function_tool_is_called_and_its_result_reaches_the_conversation(engine):
    """A @function_tool the agent declares: the server calls it the OpenAI way (a function_call output
    item, completed, with arguments), the SDK runs it, sends function_call_output (and
    response.create), and the server adds the output to the conversation."""
    calls: list[dict] = []

    from agents import function_tool

    @function_tool(name_override=TOOL_NAME)
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append({"city": city})
        return TOOL_RESULT

    with FrameworkServer(engine) as srv:
        async with agents_app(srv, tools=[get_weather]) as app:
            declared = app.sent_of("session.update")[0]["session"]["tools"]
            assert [t["name"] for t in declared] == [TOOL_NAME]
            await srv.script_tool_call()
            await until(lambda: calls, WAIT_S, f"the app's {TOOL_NAME} tool to be called", app.diagnose)
            assert calls == [{"city": TOOL_CITY}]
            outputs = await until(lambda: [e for e in app.sent_of("conversation.item.create")
                                           if e["item"]["type"] == "function_call_output"], 10,
                                  "function_call_output from the SDK", app.diagnose)
            call_id = outputs[0]["item"]["call_id"]
            assert outputs[0]["item"]["output"] == TOOL_RESULT
            added = await until(lambda: [e for e in app.server_of("conversation.item.added")
                                         if e["item"].get("type") == "function_call_output"
                                         and e["item"].get("call_id") == call_id], 10,
                                "conversation.item.added for the function_call_output", app.diagnose)
            assert added
            tool_end = [e for e in app.of_type("tool_end") if e.tool.name == TOOL_NAME]
            assert tool_end and tool_end[0].output == TOOL_RESULT
            done = [i for i in app.history if i.type == "function_call" and i.call_id == call_id]
            assert done and done[-1].output == TOOL_RESULT
            assert json.loads(done[-1].arguments) == {"city": TOOL_CITY}
            app.alive()
            assert not app.contract_errors(), app.diagnose()


async def test_agents_app_gets_no_error_for_microturn_task_events(engine):
    """A background task the model starts (a scripted task marker: a sum for the calculator) streams
    microturn's `task.created/delta/done` events; an agents app must not see them as errors (the SDK
    turns every server event outside the GA union into a RealtimeError)."""
    with FrameworkServer(engine) as srv:
        async with agents_app(srv) as app:
            await srv.script_tool_call("what is 17 times 23")
            await until(lambda: app.server_of("task.done") or app.server_of("task.error"), WAIT_S,
                        "the model's background task to finish", app.diagnose)
            await asyncio.sleep(0.5)
            app.alive()
            noise = [str(e).splitlines()[1] if "\n" in str(e) else str(e) for e in app.errors
                     if _is_extension_event_error(e)]
            assert not noise, f"{len(noise)} RealtimeError events for microturn task events: {noise[:3]}"


# ============================================================================ pipecat
pipecat_llm = pytest.importorskip("pipecat.services.openai.realtime.llm")


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
            assert ANSWER_WORD in text.lower() and _not_doubled(text), (text, app.diagnose())
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
            await until(lambda: _truncated(app, playing), 10, "conversation.item.truncated", app.diagnose)
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


# ============================================================================ livekit
lk_realtime = pytest.importorskip("livekit.plugins.openai.realtime")


class LivekitApp:
    """A headless livekit-agents app on `RealtimeModel(base_url=...).session()`: consumes every
    generation's message streams (text, 24 kHz audio frames) and function stream, and records the raw
    events both ways (`openai_server_event_received`, `openai_client_event_queued`)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.server: list[dict] = []
        self.sent: list[dict] = []
        self.errors: list[Any] = []
        self.generations: list[dict] = []
        self.functions: list[Any] = []
        self.transcripts: list[Any] = []
        self.speech_started = 0
        self._tasks: list[asyncio.Task] = []
        session.on("openai_server_event_received", self.server.append)
        session.on("openai_client_event_queued", self.sent.append)
        session.on("error", self.errors.append)
        session.on("generation_created", self._on_generation)
        session.on("input_audio_transcription_completed", self.transcripts.append)
        session.on("input_speech_started", self._on_speech_started)

    def _on_speech_started(self, _event: Any) -> None:
        self.speech_started += 1

    def _on_generation(self, gen: Any) -> None:
        record: dict = {"event": gen, "messages": [], "done": False}
        self.generations.append(record)

        async def messages() -> None:
            async for msg in gen.message_stream:
                m = {"id": msg.message_id, "text": "", "samples": 0, "rates": set(), "done": False}
                record["messages"].append(m)

                async def text(m: dict = m, msg: Any = msg) -> None:
                    async for delta in msg.text_stream:
                        m["text"] += delta

                async def audio(m: dict = m, msg: Any = msg) -> None:
                    async for frame in msg.audio_stream:
                        m["samples"] += frame.samples_per_channel
                        m["rates"].add(frame.sample_rate)

                await asyncio.gather(text(), audio())
                m["done"] = True

        async def functions() -> None:
            async for call in gen.function_stream:
                self.functions.append(call)

        async def both() -> None:
            await asyncio.gather(messages(), functions())
            record["done"] = True

        self._tasks.append(asyncio.create_task(both()))

    def server_of(self, kind: str) -> list[dict]:
        return [e for e in self.server if e.get("type") == kind]

    def sent_of(self, kind: str) -> list[dict]:
        return [e for e in self.sent if e.get("type") == kind]

    def diagnose(self) -> str:
        return (f"{event_types(self.server)}\nerrors: {[repr(e.error)[:300] for e in self.errors]}"
                f"\nserver errors: {errors_of(self.server)}\nsent: {[e.get('type') for e in self.sent]}")


@asynccontextmanager
async def livekit_app(srv: FrameworkServer) -> AsyncIterator[LivekitApp]:
    model = lk_realtime.RealtimeModel(api_key=API_KEY, base_url=srv.http_base)
    session = model.session()
    app = LivekitApp(session)
    try:
        # a socket the server drops makes livekit reconnect at once, forever: stop at the second error
        await until(lambda: app.server_of("session.updated") or len(app.errors) >= 2, 15, "session.updated",
                    app.diagnose)
        assert app.server_of("session.updated"), "no session.updated: the session failed\n" + app.diagnose()
        yield app
    finally:
        for task in app._tasks:
            task.cancel()
        with suppress(BaseException):
            await asyncio.wait_for(session.aclose(), 10)
        await model.aclose()


async def _livekit_user_text(app: LivekitApp, text: str) -> None:
    """Put a typed user message into the conversation as livekit does (update_chat_ctx: a
    conversation.item.create carrying livekit's own item id, confirmed by conversation.item.added of that
    id)."""
    ctx = app.session.chat_ctx.copy()
    ctx.add_message(role="user", content=text)
    await app.session.update_chat_ctx(ctx)


async def test_livekit_generate_reply_streams_text_and_audio(engine):
    """update_chat_ctx (a typed user item) + generate_reply(): the future resolves on the
    response.created that echoes its metadata.client_event_id (user_initiated), and the reply's
    message stream carries the transcript and 24 kHz audio frames, closed at response.done."""
    with FrameworkServer(engine) as srv:
        async with livekit_app(srv) as app:
            await _livekit_user_text(app, TYPED_QUESTION)
            created = [e for e in app.server_of("conversation.item.added") if e["item"].get("role") == "user"]
            assert created, app.diagnose()
            assert created[-1]["item"]["id"] == app.sent_of("conversation.item.create")[-1]["item"]["id"]
            gen = await asyncio.wait_for(app.session.generate_reply(), 15)
            assert gen.user_initiated and gen.response_id
            record = next(r for r in app.generations if r["event"] is gen)
            await until(lambda: record["done"] and record["messages"], WAIT_S,
                        "the generation's streams to close (response.output_item.done, response.done)",
                        app.diagnose)
            message = record["messages"][0]
            text = message["text"]
            assert ANSWER_WORD in text.lower() and _not_doubled(text), (message, app.diagnose())
            assert message["rates"] == {RATE} and message["samples"] >= RATE // 5 * 2
            asked = app.sent_of("response.create")[-1]
            echoed = [e for e in app.server_of("response.created") if e["response"]["id"] == gen.response_id]
            assert echoed[0]["response"]["metadata"]["client_event_id"] == asked["event_id"]
            assert not app.errors, app.diagnose()


async def test_livekit_spoken_turn_is_transcribed(engine, hello_pcm):
    """push_audio(rtc.AudioFrame) in real time: input_speech_started, then a final
    input_audio_transcription_completed with the text the server heard."""
    from livekit import rtc

    with FrameworkServer(engine) as srv:
        async with livekit_app(srv) as app:
            def push(chunk: bytes) -> None:
                app.session.push_audio(rtc.AudioFrame(chunk, RATE, 1, len(chunk) // 2))

            await stream_realtime(push, hello_pcm)
            final = await until(lambda: [t for t in app.transcripts if t.is_final and t.transcript.strip()],
                                WAIT_S, "a final input transcription", app.diagnose)
            assert app.speech_started >= 1 and final[0].item_id
            assert app.sent_of("input_audio_buffer.append")
            assert not app.errors, app.diagnose()


async def test_livekit_interrupt_and_truncate_then_reply_again(engine):
    """The app interrupts a reply it is playing (interrupt() = response.cancel, truncate() =
    conversation.item.truncate): the response ends cancelled, the truncation is confirmed, and the
    session takes the next generate_reply."""
    with FrameworkServer(engine) as srv:
        async with livekit_app(srv) as app:
            await _livekit_user_text(app, TYPED_QUESTION)
            gen = await asyncio.wait_for(app.session.generate_reply(), 15)
            record = next(r for r in app.generations if r["event"] is gen)
            await until(lambda: record["messages"] and record["messages"][0]["samples"] > 0, WAIT_S,
                        "the reply's first audio frame", app.diagnose)
            playing = record["messages"][0]["id"]
            app.session.truncate(message_id=playing, modalities=["audio", "text"], audio_end_ms=200)
            app.session.interrupt()
            await until(lambda: record["done"], 15, "the interrupted generation to close", app.diagnose)
            done = [e for e in app.server_of("response.done") if e["response"]["id"] == gen.response_id]
            assert done and done[0]["response"]["status"] in ("cancelled", "completed"), app.diagnose()
            await until(lambda: _truncated(app, playing), 10, "conversation.item.truncated", app.diagnose)
            assert app.sent_of("response.cancel")
            again = await asyncio.wait_for(app.session.generate_reply(), 15)
            assert again.response_id != gen.response_id
            assert not app.errors, app.diagnose()


async def test_livekit_function_tool_call_reaches_the_function_stream(engine):
    """update_tools([function_tool]): the server's call arrives as a FunctionCall on the generation's
    function_stream (response.output_item.done with a function_call item); the app's output goes back
    via update_chat_ctx as a function_call_output item, confirmed by conversation.item.added."""
    from livekit.agents import llm

    @llm.function_tool(name=TOOL_NAME)
    async def get_weather(city: str) -> str:
        """The weather in a city."""
        return TOOL_RESULT

    with FrameworkServer(engine) as srv:
        async with livekit_app(srv) as app:
            await app.session.update_tools([get_weather])
            await until(lambda: [u for u in app.sent_of("session.update") if u["session"].get("tools")], 5,
                        "the tools in session.update", app.diagnose)
            await asyncio.sleep(0.5)
            await srv.script_tool_call()
            calls = await until(lambda: app.functions, WAIT_S, "a FunctionCall on a function_stream",
                                app.diagnose)
            call = calls[0]
            assert call.name == TOOL_NAME and json.loads(call.arguments) == {"city": TOOL_CITY}
            ctx = app.session.chat_ctx.copy()
            assert ctx.get_by_id(call.id) is not None, "the function_call item is not in the remote chat ctx"
            ctx.items.append(llm.FunctionCallOutput(call_id=call.call_id, output=TOOL_RESULT, is_error=False,
                                                    name=TOOL_NAME))
            await app.session.update_chat_ctx(ctx)
            added = [e["item"] for e in app.server_of("conversation.item.added")]
            added = [i for i in added if i.get("type") == "function_call_output"
                     and i.get("call_id") == call.call_id]
            assert added, app.diagnose()
            assert not app.errors, app.diagnose()

