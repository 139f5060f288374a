"""The offline local backend and its tools, with real sentence embeddings for knowledge search."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from microturn.server.background.backends import LocalBackend, TaskDelta, TaskResult
from microturn.server.background.backends.local import find_expression
from microturn.server.background.context import ContextPackage, TaskSpec
from microturn.server.background.knowledge import KnowledgeBase, split_sections
from microturn.server.background.tools import Tool, ToolError, ToolRegistry, default_registry


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
