"""The offline local backend and its tools, with real sentence embeddings for knowledge search."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from microturn.server.background.backends import LocalBackend, TaskDelta, TaskResult
from microturn.server.background.backends import local as local_backend
from microturn.server.background.backends.local import find_expression
from microturn.server.background.backends.tool_choice import (
    MATCH_THRESHOLD,
    fill_arguments,
    match_tool,
    name_words,
    phrase,
)
from microturn.server.background.context import ContextPackage, TaskSpec
from microturn.server.background.knowledge import KnowledgeBase, split_sections
from microturn.server.background.tools import Tool, ToolError, ToolRegistry, default_registry, session_tools


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return default_registry()


def _ctx(text: str, **task: Any) -> ContextPackage:
    spec = TaskSpec(task_id="t1", input=text, scheduling="when_idle", origin="client", created_at=0.0, **task)
    return ContextPackage(session_id="s1", task=spec, created_at=0.0)


async def _run(registry: ToolRegistry, text: str, **task: Any) -> tuple[list[str], TaskResult]:
    events = [event async for event in LocalBackend(registry).run(_ctx(text, **task))]
    assert all(isinstance(e, TaskDelta) for e in events[:-1]) and isinstance(events[-1], TaskResult)
    return [e.text for e in events[:-1]], events[-1]


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("what is 17 times 23?", "17*23"),
        ("compute (2 + 3) * 4 please", "(2+3)*4"),
        ("2 to the power of 10", "2**10"),
        ("what's 100 divided by 8", "100/8"),
        ("3 squared plus 4 squared", "3**2+4**2"),
        ("12.5 x 4", "12.5*4"),
        ("I have 2 cats and 3 dogs", None),
        ("what time is it in Tokyo", None),
    ],
)
def test_find_expression(text: str, expression: str | None) -> None:
    assert find_expression(text) == expression


async def test_arithmetic_streams_steps_and_answers(registry: ToolRegistry) -> None:
    deltas, result = await _run(registry, "What is 17 times 23?")
    assert deltas == [
        "Thinking: the task looks like arithmetic.\n",
        "Calling calculator(expression='17*23').\n",
        "Result: 17*23 = 391\n",
    ]
    assert result.text == "17*23 = 391"
    assert result.data == {"tool": "calculator", "arguments": {"expression": "17*23"}, "output": "391"}


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"expression": "__import__('os')"}, "function calls"),
        ({"expression": "().__class__"}, "attribute access"),
        ({"expression": "2**10**10"}, "exponent"),
    ],
)
async def test_calculator_refuses_code_and_huge_powers(
    registry: ToolRegistry, arguments: dict, reason: str
) -> None:
    with pytest.raises(ToolError, match=reason):
        await _run(registry, "calc", tool="calculator", arguments=arguments)


async def test_huge_power_in_plain_words_is_refused(registry: ToolRegistry) -> None:
    with pytest.raises(ToolError, match="calculator refused '2\\*\\*10\\*\\*10': exponent"):
        await _run(registry, "what is 2**10**10")


async def test_clock_with_time_zone(registry: ToolRegistry) -> None:
    _, result = await _run(registry, "What time is it in Asia/Tokyo?")
    assert result.data["arguments"] == {"timezone": "Asia/Tokyo"}
    assert re.fullmatch(
        r"It is \w+day \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(Asia/Tokyo, UTC\+0900\)\.", result.text
    )
    with pytest.raises(ToolError, match="unknown time zone 'Mars/Base'"):
        await registry.call("clock", {"timezone": "Mars/Base"})


async def test_clock_result_has_a_brief_twelve_hour_form(registry: ToolRegistry) -> None:
    _, result = await _run(registry, "what time is it")
    hour, minute = re.search(r" (\d\d):(\d\d):\d\d ", result.data["output"]).groups()
    assert result.data["brief"] == f"{int(hour) % 12 or 12}:{minute}"
    _, sum_result = await _run(registry, "What is 17 times 23?")
    assert "brief" not in sum_result.data, "the calculator's output is already its brief form"
    clock = registry.get("clock").brief
    assert clock is not None and clock("Tuesday 2026-12-01 00:05:09 (UTC, UTC+0000)") == "12:05"
    assert clock("not a time") is None


async def test_a_registered_tool_gives_its_own_brief_form() -> None:
    async def weather(city: str) -> dict[str, Any]:
        return {"city": city, "celsius": 21, "sky": "clear"}

    registry = ToolRegistry()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    registry.register(Tool("weather", "Weather now.", schema, weather,
                           brief=lambda out: f"{out['celsius']} degrees, {out['sky']}"))
    _, result = await _run(registry, "weather in Oslo", tool="weather", arguments={"city": "Oslo"})
    assert result.data["output"]["city"] == "Oslo" and result.data["brief"] == "21 degrees, clear"


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("which colours does a printer mix with ink", "colours.md"),
        ("how long should I boil an egg", "cooking.md"),
        ("what is the largest planet", "solar-system.md"),
        ("how long is one micro-turn of the server", "microturn.md"),
        ("what happens to a when_idle result after a barge-in", "background-tasks.md"),
        ("which vocoder turns mel frames into a waveform", "speech-audio.md"),
    ],
)
async def test_knowledge_search_finds_the_right_file(registry: ToolRegistry, query: str, path: str) -> None:
    hits = await registry.call("knowledge_search", {"query": query, "k": 2})
    assert hits[0]["path"] == path, hits
    assert hits[0]["score"] > hits[1]["score"]


async def test_knowledge_is_the_default_route(registry: ToolRegistry) -> None:
    deltas, result = await _run(registry, "tell me about the primary colours of screens")
    assert deltas[1] == "Calling knowledge_search(query='tell me about the primary colours of screens').\n"
    assert result.text.startswith("From colours.md (Primary colours): Screens mix light additively")


def test_custom_folder_and_sections(tmp_path: Path) -> None:
    (tmp_path / "pets.md").write_text(
        "# Pets\n\n## Cats\nCats purr and sleep a lot.\n\n## Dogs\nDogs bark.\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "trains.md").write_text("Steam locomotives burn coal to boil water.\n")
    kb = KnowledgeBase(tmp_path)
    assert kb.warm() == 3
    assert [(s.path, s.title) for s in kb.sections()] == [
        ("pets.md", "Cats"),
        ("pets.md", "Dogs"),
        ("sub/trains.md", "trains"),
    ]
    hits = kb.search("which animal barks", k=3)
    assert (hits[0].path, hits[0].title) == ("pets.md", "Dogs")
    assert kb.search("railway engines")[0].path == "sub/trains.md"


def test_split_sections_drops_empty_ones() -> None:
    sections = split_sections("a.md", "# Title\n\n## Empty\n## Full\ntext\n")
    assert [(s.title, s.text) for s in sections] == [("Full", "text")]


async def test_user_tools_and_argument_validation() -> None:
    registry = ToolRegistry()

    @registry.tool(
        "shout",
        "Upper-case a word.",
        {
            "type": "object",
            "properties": {"word": {"type": "string"}},
            "required": ["word"],
            "additionalProperties": False,
        },
    )
    async def shout(word: str) -> str:
        return word.upper()

    assert await registry.call("shout", '{"word": "hey"}') == "HEY"
    _, result = await _run(registry, "hello", tool="shout")
    assert result.text == "HELLO"
    with pytest.raises(ToolError, match="invalid arguments: 'word' is a required property"):
        await registry.call("shout", {})
    with pytest.raises(ToolError, match="not valid JSON"):
        await registry.call("shout", "{word")
    with pytest.raises(ToolError, match="unknown tool 'nope'; known: shout"):
        await registry.call("nope", {})
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Tool("shout", "again", {"type": "object"}, shout))
    with pytest.raises(ValueError, match="type 'object'"):
        registry.register(Tool("bad", "array args", {"type": "array"}, shout))


# --- client-declared tools: matched by meaning, arguments read from the task text ---

def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


ORDER = _schema({"order_id": {"type": "string"}}, ["order_id"])
WEATHER = _schema(
    {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]
)
TIMER = _schema({"minutes": {"type": "integer", "minimum": 1}, "label": {"type": "string"}}, ["minutes"])
LIGHTS = _schema(
    {"room": {"type": "string", "enum": ["kitchen", "living_room", "bedroom"]}, "on": {"type": "boolean"}},
    ["room"],
)
TABLE = _schema({"people": {"type": "integer"}, "hour": {"type": "number"}}, ["people", "hour"])
EMAIL = _schema({"to": {"type": "string"}, "body": {"type": "string"}}, ["to", "body"])


@pytest.mark.parametrize(
    ("schema", "text", "words", "arguments", "problem"),
    [
        (ORDER, "where is my order A17?", ["lookup", "order"], {"order_id": "A17"}, None),
        (ORDER, "look up order number 4411", ["lookup", "order"], {"order_id": "4411"}, None),
        (ORDER, "where is my parcel?", ["lookup", "order"], {"order_id": "where is my parcel"}, None),
        (WEATHER, "will it be sunny in Rome, celsius?", ["get", "weather"],
         {"city": "will it be sunny in Rome", "unit": "celsius"}, None),
        (WEATHER, "what's the weather in Paris in Fahrenheit", ["get", "weather"],
         {"city": "Paris", "unit": "fahrenheit"}, None),
        (WEATHER, "can you get me the weather in Oslo", ["get", "weather"], {"city": "Oslo"}, None),
        (TIMER, "set a timer for 5 minutes", ["set", "timer"], {"minutes": 5}, None),
        (TIMER, "set a timer for 2.5 minutes", ["set", "timer"], {}, "required minutes"),
        (TIMER, "set a timer for 0 minutes", ["set", "timer"], {"minutes": 0}, "do not fit"),
        (TIMER, "set a timer please", ["set", "timer"], {}, "required minutes"),
        (LIGHTS, "living room lights: yes", ["turn", "lights"], {"room": "living_room", "on": True}, None),
        (LIGHTS, "kitchen or bedroom? false", ["turn", "lights"], {"room": "kitchen", "on": False}, None),
        (TABLE, "book a table for 4 people at 19.5", ["book", "table"], {"people": 4, "hour": 19.5}, None),
        (TABLE, "book a table for 4", ["book", "table"], {"people": 4}, "required hour"),
        (_schema({"n": {"type": "integer"}}, ["n"]), "order A17 and v2", [], {}, "required n"),
        (EMAIL, "email Bob that I am late", ["send", "email"], {}, "required to, body"),
        (_schema({"ids": {"type": "array"}}, ["ids"]), "items 1 and 2", [], {}, "required ids"),
        # a task that named its tool: the text is the argument itself
        (ORDER, "order A17", None, {"order_id": "order A17"}, None),
    ],
)
def test_fill_arguments_by_schema(
    schema: dict, text: str, words: list[str] | None, arguments: dict, problem: str | None
) -> None:
    filled = fill_arguments(schema, text, words)
    assert filled.arguments == arguments
    if problem is None:
        assert filled.problem is None
    else:
        assert filled.problem is not None and problem in filled.problem


def test_name_words_split_identifiers() -> None:
    assert name_words("getWeather_now") == ["get", "weather", "now"]
    assert name_words("lookup-order2") == ["lookup", "order", "2"]
    assert phrase("the weather", ["weather"]) == "the weather", "nothing after the tool-ish word: all of it"


def _recording_tool(name: str, description: str, schema: dict, output: Any, calls: list[dict]) -> Tool:
    async def fn(**arguments: Any) -> Any:
        calls.append(arguments)
        return output

    return Tool(name, description, schema, fn)


def _client_tools(calls: list[dict]) -> dict[str, Tool]:
    tools = [
        _recording_tool("lookup_order", "Look up the shipping status of a customer's order by its order id.",
                        ORDER, "shipped on Monday", calls),
        _recording_tool("get_weather", "Get the current weather forecast for a city.", WEATHER,
                        {"sky": "clear", "celsius": 21}, calls),
        _recording_tool("set_timer", "Start a countdown timer for a number of minutes.", TIMER, "ok", calls),
    ]
    return {tool.name: tool for tool in tools}


async def _run_with_client_tools(
    registry: ToolRegistry, tools: dict[str, Tool], text: str, offered: list[str] | None = None, **task: Any
) -> tuple[list[str], TaskResult]:
    """Run the backend as a pool task does: client tools in `session_tools`, their specs in the package."""
    ctx = _ctx(text, **task)
    ctx.tools = registry.specs() + [tools[n].spec() for n in (tools if offered is None else offered)]
    token = session_tools.set(tools)
    try:
        events = [event async for event in LocalBackend(registry).run(ctx)]
    finally:
        session_tools.reset(token)
    return [e.text for e in events[:-1]], events[-1]


async def test_a_matching_client_tool_is_called_with_arguments_from_the_text(registry: ToolRegistry) -> None:
    calls: list[dict] = []
    deltas, result = await _run_with_client_tools(registry, _client_tools(calls), "where is my order A17?")
    assert calls == [{"order_id": "A17"}]
    assert deltas == [
        "Thinking: the task matches the client tool lookup_order.\n",
        "Calling lookup_order(order_id='A17').\n",
        "Result: shipped on Monday\n",
    ]
    assert result.text == "shipped on Monday"
    similarity = result.data.pop("similarity")
    assert MATCH_THRESHOLD <= similarity <= 1
    assert result.data == {"tool": "lookup_order", "arguments": {"order_id": "A17"}, "output": result.text}

    text = "how is the weather in Rome, in celsius?"
    _, weather = await _run_with_client_tools(registry, _client_tools(calls), text)
    assert calls[-1] == {"city": "Rome", "unit": "celsius"}
    assert weather.text == '{"sky": "clear", "celsius": 21}', "a structured output is answered as JSON"


@pytest.mark.parametrize(
    ("text", "tool"),
    [
        ("what is 17 times 23?", "calculator"),
        ("what time is it in Asia/Tokyo?", "clock"),
        ("what day is it today", "clock"),
        ("tell me about the primary colours of screens", "knowledge_search"),
    ],
)
async def test_builtins_keep_their_tasks_beside_client_tools(
    registry: ToolRegistry, text: str, tool: str
) -> None:
    calls: list[dict] = []
    _, result = await _run_with_client_tools(registry, _client_tools(calls), text)
    assert result.data["tool"] == tool and calls == []


async def test_a_matching_tool_whose_arguments_are_not_in_the_text_falls_back(registry: ToolRegistry) -> None:
    calls: list[dict] = []
    deltas, result = await _run_with_client_tools(registry, _client_tools(calls), "set a timer please")
    assert deltas[0] == (
        "Thinking: set_timer matches but the task does not give its required minutes; "
        "searching the knowledge base.\n"
    )
    assert result.data["tool"] == "knowledge_search" and calls == []


async def test_only_offered_client_tools_are_matched_and_named_ones_get_the_whole_text(
    registry: ToolRegistry,
) -> None:
    calls: list[dict] = []
    tools = _client_tools(calls)
    text = "where is my order A17?"
    _, result = await _run_with_client_tools(registry, tools, text, offered=["get_weather"])
    assert result.data["tool"] == "knowledge_search" and calls == []
    _, named = await _run_with_client_tools(registry, tools, "order A17", tool="lookup_order")
    assert calls == [{"order_id": "order A17"}] and named.text == "shipped on Monday"


async def test_matching_runs_off_the_event_loop(
    registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []

    def recording_match(text: str, tools: list[Tool]) -> tuple[Tool, float] | None:
        threads.append(threading.current_thread())
        return match_tool(text, tools)

    monkeypatch.setattr(local_backend, "match_tool", recording_match)
    calls: list[dict] = []
    await _run_with_client_tools(registry, _client_tools(calls), "where is my order A17?")
    assert threads and threads[0] is not threading.current_thread() and calls


async def test_a_failing_encoder_leaves_the_builtins_working(
    registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text: str, tools: list[Tool]) -> None:
        raise OSError("no weights")

    monkeypatch.setattr(local_backend, "match_tool", broken)
    calls: list[dict] = []
    _, result = await _run_with_client_tools(registry, _client_tools(calls), "What is 17 times 23?")
    assert result.text == "17*23 = 391" and calls == []


async def test_no_client_tools_no_encoding(registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_match(text: str, tools: list[Tool]) -> None:
        raise AssertionError("matched without client tools")

    monkeypatch.setattr(local_backend, "match_tool", no_match)
    _, result = await _run(registry, "What is 17 times 23?")
    assert result.text == "17*23 = 391"


# measured pairs (see MATCH_THRESHOLD): requests clear it for their tool, other tasks stay under it
MATCHING = [
    ("has order 4411 shipped yet", "lookup_order"),
    ("what's the weather in Paris", "get_weather"),
    ("start a countdown of 3 minutes", "set_timer"),
]
NOT_MATCHING = ["what is 2 to the power of 10", "which weekday is it", "who wrote Hamlet", "tell me a joke"]


async def test_similarity_threshold_separates_requests_from_other_tasks() -> None:
    tools = list(_client_tools([]).values())

    def match(text: str, offered: list[Tool] = tools) -> tuple[Tool, float] | None:
        return match_tool(text, offered)

    for text, name in MATCHING:
        found = await asyncio.to_thread(match, text)  # as the backend calls it: off the loop
        assert found is not None and found[0].name == name and found[1] >= MATCH_THRESHOLD, (text, found)
    for text in NOT_MATCHING:
        assert await asyncio.to_thread(match, text) is None, text
    assert match("", tools) is None and match("anything", []) is None
