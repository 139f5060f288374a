"""SessionBackground: tasks of one session wired to the record, the client and the text-in schedule."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers.task_events import Sink

from microturn.server.background.backends import LocalBackend, TaskDelta, TaskEvent, TaskResult
from microturn.server.background.context import ContextPackage, ToolSpec
from microturn.server.background.pool import PoolConfig, WorkerPool
from microturn.server.background.tools import default_registry
from microturn.server.background_service import SessionBackground

BUDGET = 1_000  # text-in units per take: enough for any test result


class Recording:
    """Answers 'ok <input>' in one delta and keeps every context package it got."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[ContextPackage] = []
        self.gate: asyncio.Event | None = None

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        self.seen.append(ctx)
        if self.gate is not None:
            await self.gate.wait()
        yield TaskDelta(f"ok {ctx.task.input}")
        yield TaskResult(text=f"ok {ctx.task.input}")


def _session(backend: Any, text_in: str = "stream", **config: Any) -> tuple[SessionBackground, Sink]:
    client = Sink()
    registry = default_registry()
    pool = WorkerPool(backend, PoolConfig(**config))
    return SessionBackground("s1", pool, registry, client, text_in=text_in), client


def _spoken(tasks: SessionBackground, speaking: bool = False) -> str:
    return "".join(p.text for p in tasks.take_text_in(model_speaking=speaking, budget=BUDGET))


async def test_local_task_streams_to_client_record_and_text_in() -> None:
    tasks, client = _session(LocalBackend(default_registry()))
    task_id = tasks.submit("what is 17 times 23?", "when_idle", client_event_id="e1")
    assert client.events[0] == {
        "type": "task.created",
        "task_id": task_id,
        "client_event_id": "e1",
        "task": {
            "input": "what is 17 times 23?",
            "scheduling": "when_idle",
            "tool": None,
            "origin": "client",
        },
    }
    done = await client.final(task_id)
    assert done["result"]["text"] == "17*23 = 391"
    assert client.types(task_id) == ["task.created"] + ["task.delta"] * 3 + ["task.done"]
    assert _spoken(tasks, speaking=True) == ""
    spoken = _spoken(tasks)
    assert spoken.endswith("Result: 17*23 = 391\n") and spoken.count("391") == 1
    assert [(i.role, i.text) for i in tasks.record.items] == [("task", "17*23 = 391")]


async def test_result_mode_puts_only_the_tool_output_into_text_in() -> None:
    tasks, client = _session(LocalBackend(default_registry()), text_in="result")
    task_id = tasks.submit("what is 17 times 23?", "when_idle")
    await client.final(task_id)
    assert client.types(task_id) == ["task.created"] + ["task.delta"] * 3 + ["task.done"]
    assert _spoken(tasks) == "391"
    assert [(i.role, i.text) for i in tasks.record.items] == [("task", "17*23 = 391")]


async def test_result_mode_puts_the_brief_form_of_the_clock_into_text_in() -> None:
    tasks, client = _session(LocalBackend(default_registry()), text_in="result")
    task_id = tasks.submit("what time is it?", "when_idle")
    done = await client.final(task_id)
    assert done["result"]["output"].endswith("(UTC, UTC+0000)"), "the client still gets the full line"
    spoken = _spoken(tasks)
    assert spoken == done["result"]["brief"] and re.fullmatch(r"(1[0-2]|[1-9]):[0-5]\d", spoken)


async def test_a_task_on_a_client_tool_waits_for_the_client_and_stops_waiting_when_cancelled() -> None:
    tasks, client = _session(LocalBackend(default_registry()))
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tasks.client_tools = [ToolSpec(name="weather", description="the weather in a city", parameters=city)]
    assert tasks.submit("weather", tool="nope") is None
    assert client.events[-1]["error"]["code"] == "unknown_tool"
    answered = tasks.submit("Paris", tool="weather")
    waiting = tasks.submit("Oslo", tool="weather")
    for _ in range(100):
        calls = [e for e in client.events if e["type"] == "response.function_call_arguments.done"]
        if len(calls) == 2:
            break
        await asyncio.sleep(0.01)
    by_task = {c["task_id"]: c for c in calls}
    assert by_task[answered]["name"] == "weather" and by_task[answered]["arguments"] == '{"city": "Paris"}'
    assert tasks.function_call_output(by_task[answered]["call_id"], "sunny, 21 C")
    done = await client.final(answered)
    assert done["result"]["text"] == "sunny, 21 C" and done["result"]["output"] == "sunny, 21 C"
    assert tasks.cancel(waiting)
    assert (await client.final(waiting))["type"] == "task.cancelled"
    assert not tasks.function_call_output(by_task[waiting]["call_id"], "too late")


async def test_later_context_holds_earlier_results_and_session_state() -> None:
    backend = Recording()
    tasks, client = _session(backend)
    tasks.instructions = "be brief"
    tasks.record.add_user_text("first question")
    first = tasks.submit("one")
    await client.final(first)
    tasks.record.add_model_text("the model talks")
    second = tasks.submit("two", origin="model")
    await client.final(second)
    ctx = backend.seen[1]
    assert ctx.instructions == "be brief" and ctx.task.origin == "model"
    assert [(i.role, i.text) for i in ctx.conversation] == [
        ("user", "first question"),
        ("task", "ok one"),
        ("model", "the model talks"),
    ]
    assert {t.name for t in ctx.tools} == {"calculator", "clock", "knowledge_search"}


@pytest.mark.parametrize(
    ("scheduling", "while_speaking", "after"),
    [
        ("interrupt", "ok x", ""),
        ("when_idle", "", "ok x"),
        ("silent", "", ""),
    ],
)
async def test_scheduling_modes(scheduling: str, while_speaking: str, after: str) -> None:
    tasks, client = _session(Recording())
    await client.final(tasks.submit("x", scheduling))
    assert _spoken(tasks, speaking=True) == while_speaking
    assert _spoken(tasks) == after
    assert tasks.record.items[-1].text == "ok x", "every mode keeps the result in the record"


async def test_barge_in_makes_a_pending_when_idle_result_stale() -> None:
    tasks, client = _session(Recording())
    await client.final(tasks.submit("before"))
    tasks.barge_in(epoch=1)
    assert _spoken(tasks) == ""
    await client.final(tasks.submit("after"))
    assert _spoken(tasks) == "ok after"


async def test_barge_in_can_cancel_running_tasks() -> None:
    backend = Recording()
    backend.gate = asyncio.Event()
    tasks, client = _session(backend)
    task_id = tasks.submit("slow")
    tasks.barge_in(epoch=1, cancel_tasks=True)
    assert (await client.final(task_id))["reason"] == "barge_in"


async def test_result_without_deltas_is_spoken_once() -> None:
    class Quiet:
        name = "quiet"

        async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
            yield TaskResult(text="only the answer")

    tasks, client = _session(Quiet())
    await client.final(tasks.submit("q", "interrupt"))
    pieces = tasks.take_text_in(model_speaking=True, budget=BUDGET)
    assert [(p.text, p.final) for p in pieces] == [("only the answer", True)]


async def test_refusals_and_cancel() -> None:
    backend = Recording()
    backend.gate = asyncio.Event()
    tasks, client = _session(backend, max_per_session=1)
    running = tasks.submit("long")
    assert tasks.submit("too many", client_event_id="e2") is None
    refused = client.events[-1]
    assert refused["type"] == "task.error" and refused["error"]["code"] == "task_limit"
    assert refused["client_event_id"] == "e2" and client.types(refused["task_id"]) == ["task.error"]
    assert tasks.submit("x", tool="no_such_tool") is None
    assert client.events[-1]["error"]["code"] == "unknown_tool"
    with pytest.raises(ValueError, match="scheduling must be one of interrupt, when_idle, silent"):
        tasks.submit("x", "sometimes")  # type: ignore[arg-type]
    assert tasks.cancel("task_unknown") is False
    assert tasks.cancel(running) is True
    assert (await client.final(running))["reason"] == "cancelled"
    assert _spoken(tasks) == ""


async def test_close_cancels_the_session_tasks() -> None:
    backend = Recording()
    backend.gate = asyncio.Event()
    tasks, client = _session(backend)
    ids = [tasks.submit("a"), tasks.submit("b")]
    assert tasks.close() == 2
    assert [(await client.final(i))["reason"] for i in ids] == ["session_end", "session_end"]
