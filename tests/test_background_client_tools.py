"""Client-declared tools through a session's background with the offline local backend: the task picks the
tool, the call goes to the client, the client's function_call_output answers it; and what goes wrong."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from microturn.server.background.backends import LocalBackend
from microturn.server.background.context import ToolSpec
from microturn.server.background.knowledge import load_encoder
from microturn.server.background.pool import WorkerPool
from microturn.server.background.tools import ToolRegistry, default_registry
from microturn.server.background_service import SessionBackground

WAIT_S = 10.0  # bound on any one wait in these tests
SHORT_TIMEOUT_S = 1.0  # the timeout of a task whose client never answers
CALL = "response.function_call_arguments.done"
LAST = ("task.done", "task.error", "task.cancelled")

ORDER = ToolSpec(
    name="lookup_order",
    description="Look up the shipping status of a customer's order by its order id.",
    parameters={"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)
TIMER = ToolSpec(
    name="set_timer",
    description="Start a countdown timer for a number of minutes.",
    parameters={
        "type": "object",
        "properties": {"minutes": {"type": "integer", "minimum": 1}, "label": {"type": "string"}},
        "required": ["minutes"],
    },
)
BROKEN = ToolSpec(name="broken", description="a schema the client got wrong",
                  parameters={"type": "object", "properties": {"n": {"type": 7}}})


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    load_encoder()  # loaded once up front, so no task's timeout counts the model load
    return default_registry()


class Session:
    """A session's background over a local-backend pool, recording what it sends to the client."""

    def __init__(self, registry: ToolRegistry, session_id: str = "s1") -> None:
        self.pool = WorkerPool(LocalBackend(registry))
        self.events: list[dict[str, Any]] = []
        self.background = SessionBackground(session_id, self.pool, registry, self.events.append)
        self.background.client_tools = [ORDER, TIMER, BROKEN]

    async def until(self, check: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        while not (found := [e for e in self.events if check(e)]):
            assert time.monotonic() < deadline, self.events
            await asyncio.sleep(0.01)
        return found

    async def call_of(self, task_id: str) -> dict[str, Any]:
        (call,) = await self.until(lambda e: e["type"] == CALL and e["task_id"] == task_id)
        return call

    async def last_of(self, task_id: str) -> dict[str, Any]:
        (last,) = await self.until(lambda e: e["type"] in LAST and e["task_id"] == task_id)
        return last


async def test_the_matched_client_tool_is_called_on_the_client_and_its_output_answers(
    registry: ToolRegistry,
) -> None:
    session = Session(registry)
    task_id = session.background.submit("where is my order A17?")
    assert task_id is not None
    call = await session.call_of(task_id)
    assert call["name"] == "lookup_order" and json.loads(call["arguments"]) == {"order_id": "A17"}
    assert not [e for e in session.events if e["type"] in LAST], "the task waits for the client"
    assert session.background.function_call_output(call["call_id"], "shipped on Monday")
    done = await session.last_of(task_id)
    assert done["type"] == "task.done" and done["result"]["text"] == "shipped on Monday"
    assert done["result"]["tool"] == "lookup_order" and done["result"]["output"] == "shipped on Monday"
    deltas = [e["delta"]["text"] for e in session.events if e["type"] == "task.delta"]
    assert deltas[1:] == ["Calling lookup_order(order_id='A17').\n", "Result: shipped on Monday\n"]


async def test_a_client_tool_named_by_the_task_gets_its_arguments_read_by_schema(
    registry: ToolRegistry,
) -> None:
    session = Session(registry)
    task_id = session.background.submit("25 minutes for the tea", tool="set_timer")
    assert task_id is not None
    call = await session.call_of(task_id)
    assert json.loads(call["arguments"]) == {"minutes": 25}
    assert session.background.function_call_output(call["call_id"], "timer set")
    assert (await session.last_of(task_id))["result"]["text"] == "timer set"


async def test_a_client_tool_that_never_answers_times_out_and_the_sessions_other_tasks_go_on(
    registry: ToolRegistry,
) -> None:
    session = Session(registry)
    silent = session.background.submit("where is my order A17?", timeout_s=SHORT_TIMEOUT_S)
    assert silent is not None
    silent_call = await session.call_of(silent)
    other = session.background.submit("What is 17 times 23?")
    answered = session.background.submit("has order 4411 shipped yet")
    assert other is not None and answered is not None
    assert (await session.last_of(other))["result"]["text"] == "17*23 = 391"
    answered_call = await session.call_of(answered)
    assert session.background.function_call_output(answered_call["call_id"], "in transit")
    assert (await session.last_of(answered))["result"]["text"] == "in transit"
    error = await session.last_of(silent)
    assert error["type"] == "task.error" and error["error"]["code"] == "timeout"
    assert f"{SHORT_TIMEOUT_S:g} s" in error["error"]["message"]
    assert not session.background.function_call_output(silent_call["call_id"], "too late")
    assert session.pool.active("s1") == 0


async def test_unknown_or_malformed_call_ids_are_refused_and_the_waiting_call_stays(
    registry: ToolRegistry,
) -> None:
    session, stranger = Session(registry), Session(registry, "s2")
    task_id = session.background.submit("where is my order A17?")
    assert task_id is not None
    call = await session.call_of(task_id)
    wrongs = ("", "call_unknown", call["item_id"], call["call_id"].upper(), f" {call['call_id']}", task_id)
    for wrong in wrongs:
        assert not session.background.function_call_output(wrong, "x"), wrong
    assert not stranger.background.function_call_output(call["call_id"], "x"), "another session's call"
    assert not [e for e in session.events if e["type"] in LAST], "a refused output does not end the task"
    assert session.background.function_call_output(call["call_id"], "shipped")
    assert (await session.last_of(task_id))["result"]["text"] == "shipped"
    assert not session.background.function_call_output(call["call_id"], "again"), "a call is answered once"


async def test_a_cancelled_task_stops_waiting_for_its_client(registry: ToolRegistry) -> None:
    session = Session(registry)
    task_id = session.background.submit("where is my order A17?")
    assert task_id is not None
    call = await session.call_of(task_id)
    assert session.background.cancel(task_id)
    cancelled = await session.last_of(task_id)
    assert cancelled["type"] == "task.cancelled"
    assert not session.background.function_call_output(call["call_id"], "late")


async def test_a_client_tool_with_a_broken_schema_fails_only_its_task(registry: ToolRegistry) -> None:
    session = Session(registry)
    task_id = session.background.submit("seven", tool="broken", arguments={"n": 7})
    assert task_id is not None
    error = await session.last_of(task_id)
    assert error["type"] == "task.error" and error["error"]["code"] == "tool_error"
    assert "parameters schema is invalid" in error["error"]["message"]
    assert not [e for e in session.events if e["type"] == CALL], "a call that cannot be checked is not sent"
    later = session.background.submit("What is 2 plus 2?")
    assert later is not None and (await session.last_of(later))["result"]["text"] == "2+2 = 4"
