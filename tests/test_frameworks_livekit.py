"""livekit-plugins-openai's `RealtimeModel(base_url=...)` as a client of a real microturn server.

Headless: `RealtimeModel(...).session()` needs no room for the realtime session, so the test app
consumes its generation streams directly: `generate_reply`, audio frames reaching the app, a spoken
turn transcribed, interrupt + truncate, and a function tool call on the function stream. Speech is
espeak-ng made at test time; a tool call is scripted through the real model path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

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
    errors_of,
    event_types,
    not_doubled,
    stream_realtime,
    truncated,
    until,
)
from livekit.plugins.openai import realtime as lk_realtime

from microturn.server.server_events import MODEL_VOICE

pytestmark = MARKS
pytest_plugins = ["helpers.framework_fixtures"]  # engine, hello_pcm


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
    model = lk_realtime.RealtimeModel(api_key=API_KEY, base_url=srv.http_base, voice=MODEL_VOICE)
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
            assert ANSWER_WORD in text.lower() and not_doubled(text), (message, app.diagnose())
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
            await until(lambda: truncated(app, playing), 10, "conversation.item.truncated", app.diagnose)
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
