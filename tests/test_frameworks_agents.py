"""openai-agents as a client of a real microturn server (the shipped demo model, loopback).

`RealtimeAgent` + `RealtimeRunner` with `model_config={"url": ...}` pointed at microturn, used
unmodified the way an app uses it (its voice set to the model's one voice). Speech is espeak-ng
made at test time and sent in real time. The assertions are on what the app observed (history,
its tool being called, no errors) and on the client events the SDK sent (truncate on barge-in,
function_call_output). Where the model's choice must be deterministic (a tool call) the test
scripts the model's text-out through the real model path (`Session.script_text_out`). The wire
contract: README "Protocol: OpenAI Realtime, duplex".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from agents import realtime as agents_realtime
from helpers.frameworks import (
    ANSWER_WORD,
    API_KEY,
    MARKS,
    RATE,
    TOOL_CITY,
    TOOL_NAME,
    TOOL_RESULT,
    TYPED_QUESTION,
    WAIT_S,
    FrameworkServer,
    event_types,
    not_doubled,
    stream_realtime,
    truncated,
    until,
)

from microturn.server.server_events import MODEL_VOICE

pytestmark = MARKS
pytest_plugins = ["helpers.framework_fixtures"]  # engine, hello_pcm


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
    # the model speaks with one voice, and a session.update naming another is refused whole
    runner = agents_realtime.RealtimeRunner(agent, config={"model_settings": {"voice": MODEL_VOICE}})
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


async def test_agents_typed_turn_gets_one_replynot_doubled(engine):
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
            assert not_doubled(transcript) and transcript == "".join(deltas), (transcript, deltas)
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
            await until(lambda: truncated(app, playing), 10, "conversation.item.truncated", app.diagnose)
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
    """A background task the model starts (a scripted task marker: a sum for the calculator) runs, but
    microturn's own `task.*` events do not reach an OpenAI client that did not ask for them: an agents
    app would see each as an error (the SDK turns every event outside the GA union into a
    RealtimeError)."""
    with FrameworkServer(engine) as srv:
        async with agents_app(srv) as app:
            await srv.script_tool_call("what is 17 times 23")
            session = await srv.session()

            def finished() -> bool:
                return any(i.role == "task" for i in session.background.record.items)

            await until(finished, WAIT_S, "the model's background task to finish", app.diagnose)
            await asyncio.sleep(0.5)
            assert not app.server_of("task.created")
            app.alive()
            noise = [str(e).splitlines()[1] if "\n" in str(e) else str(e) for e in app.errors
                     if _is_extension_event_error(e)]
            assert not noise, f"{len(noise)} RealtimeError events for microturn task events: {noise[:3]}"
