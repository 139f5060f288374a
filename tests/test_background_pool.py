"""The worker pool: event shapes, limits, timeouts, failures and cancellation, on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers.task_events import WAIT_S, Sink

from microturn.server.background.backends import LocalBackend, TaskDelta, TaskEvent, TaskResult
from microturn.server.background.context import ContextPackage, TaskSpec
from microturn.server.background.pool import PoolConfig, TaskRejected, WorkerPool
from microturn.server.background.tools import Tool, ToolError, ToolRegistry, default_registry


class Steps:
    """Streams `parts` as deltas, then a result (or none, to test the joined default)."""

    name = "steps"

    def __init__(self, parts: list[str], final: bool = True) -> None:
        self.parts, self.final = parts, final

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        for part in self.parts:
            await asyncio.sleep(0)
            yield TaskDelta(part)
        if self.final:
            yield TaskResult(text="".join(self.parts), data={"n": len(self.parts)})


class Gated:
    """Runs until its gate opens; counts how many run at once and whether it was closed."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0
        self.peak = 0
        self.closed = 0

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            yield TaskDelta("started")
            await self.gate.wait()
            yield TaskResult(text=f"done {ctx.task.input}")
        finally:
            self.running -= 1
            self.closed += 1


class Raising:
    name = "raising"

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        yield TaskDelta("about to fail")
        raise ValueError("boom")


class Hanging:
    name = "hanging"

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        yield TaskDelta("working")
        await asyncio.Event().wait()
        yield TaskResult(text="never")


def ctx(task_id: str, session: str = "s1", text: str = "job", **task: Any) -> ContextPackage:
    spec = TaskSpec(
        task_id=task_id,
        input=text,
        scheduling=task.pop("scheduling", "when_idle"),
        origin="client",
        created_at=0.0,
        **task,
    )
    return ContextPackage(session_id=session, task=spec, created_at=0.0)


async def test_event_shapes_and_order() -> None:
    sink, pool = Sink(), WorkerPool(Steps(["a", "b", "c"]))
    assert pool.submit(ctx("t1"), sink) == "t1"
    assert sink.events == [
        {
            "type": "task.created",
            "task_id": "t1",
            "task": {"input": "job", "scheduling": "when_idle", "tool": None, "origin": "client"},
        }
    ]
    await sink.final("t1")
    assert sink.events[1:] == [
        {"type": "task.delta", "task_id": "t1", "seq": 0, "delta": {"text": "a"}},
        {"type": "task.delta", "task_id": "t1", "seq": 1, "delta": {"text": "b"}},
        {"type": "task.delta", "task_id": "t1", "seq": 2, "delta": {"text": "c"}},
        {"type": "task.done", "task_id": "t1", "result": {"n": 3, "text": "abc"}},
    ]
    assert pool.active() == 0


async def test_backend_without_result_answers_with_joined_deltas() -> None:
    sink, pool = Sink(), WorkerPool(Steps(["x", "y"], final=False))
    pool.submit(ctx("t1"), sink)
    assert await sink.final("t1") == {"type": "task.done", "task_id": "t1", "result": {"text": "xy"}}


async def test_per_session_limit_refuses_clearly_and_frees_up() -> None:
    backend = Gated()
    sink, pool = Sink(), WorkerPool(backend, PoolConfig(max_per_session=2))
    pool.submit(ctx("a1"), sink)
    pool.submit(ctx("a2"), sink)
    with pytest.raises(TaskRejected) as refused:
        pool.submit(ctx("a3"), sink)
    assert refused.value.code == "task_limit" and "2 background tasks" in refused.value.message
    assert sink.of("a3") == []
    pool.submit(ctx("b1", session="s2"), sink)
    backend.gate.set()
    for task_id in ("a1", "a2", "b1"):
        assert (await sink.final(task_id))["type"] == "task.done"
    pool.submit(ctx("a4"), sink)
    assert (await sink.final("a4"))["result"]["text"] == "done job"


async def test_global_concurrency_is_bounded_and_waiters_run_later() -> None:
    backend = Gated()
    sink, pool = Sink(), WorkerPool(backend, PoolConfig(max_concurrent=2, max_waiting=2))
    for n in range(4):
        pool.submit(ctx(f"t{n}", session=f"s{n}"), sink)
    with pytest.raises(TaskRejected) as refused:
        pool.submit(ctx("t9", session="s9"), sink)
    assert refused.value.code == "pool_full"
    await asyncio.sleep(0.01)
    assert pool.running() == 2 and pool.waiting() == 2
    backend.gate.set()
    for n in range(4):
        assert (await sink.final(f"t{n}"))["type"] == "task.done"
    assert backend.peak == 2


async def test_timeout_fails_a_hanging_backend_only() -> None:
    sink, pool = Sink(), WorkerPool(Hanging())
    pool.submit(ctx("slow"), sink, timeout_s=0.05)
    pool.submit(ctx("fine"), sink, backend=Steps(["ok"]))
    error = await sink.final("slow")
    assert error["type"] == "task.error" and error["error"]["code"] == "timeout"
    assert "0.05 s" in error["error"]["message"]
    assert [e["type"] for e in sink.of("slow")] == ["task.created", "task.delta", "task.error"]
    assert (await sink.final("fine"))["type"] == "task.done"
    with pytest.raises(TaskRejected) as refused:
        pool.submit(ctx("never"), sink, timeout_s=0)
    assert refused.value.code == "invalid_timeout"


async def test_raising_backend_fails_its_task_only() -> None:
    sink, pool = Sink(), WorkerPool(Raising())
    pool.submit(ctx("bad"), sink)
    pool.submit(ctx("good", session="s2"), sink, backend=Steps(["fine"]))
    assert await sink.final("bad") == {
        "type": "task.error",
        "task_id": "bad",
        "error": {"code": "backend_error", "message": "ValueError: boom"},
    }
    assert (await sink.final("good"))["result"]["text"] == "fine"


async def test_tool_refusal_is_a_tool_error() -> None:
    sink, pool = Sink(), WorkerPool(LocalBackend(default_registry()))
    pool.submit(
        ctx("t1", text="2**10**10", tool="calculator", arguments={"expression": "__import__('os')"}), sink
    )
    error = await sink.final("t1")
    assert error["error"]["code"] == "tool_error"
    assert "not allowed: function calls" in error["error"]["message"]


async def test_cancel_by_id_closes_the_backend_and_stops_events() -> None:
    backend = Gated()
    sink, pool = Sink(), WorkerPool(backend)
    pool.submit(ctx("t1"), sink)
    await asyncio.sleep(0.01)
    assert pool.cancel("t1", "client") is True
    assert await sink.final("t1") == {"type": "task.cancelled", "task_id": "t1", "reason": "client"}
    assert backend.closed == 1
    assert pool.cancel("t1") is False and pool.cancel("nope") is False
    backend.gate.set()
    await asyncio.sleep(0.01)
    assert [e["type"] for e in sink.of("t1")] == ["task.created", "task.delta", "task.cancelled"]


async def test_cancel_a_task_still_waiting_for_a_slot() -> None:
    backend = Gated()
    sink, pool = Sink(), WorkerPool(backend, PoolConfig(max_concurrent=1))
    pool.submit(ctx("runs"), sink)
    pool.submit(ctx("waits", session="s2"), sink)
    await asyncio.sleep(0.01)
    pool.cancel("waits")
    assert (await sink.final("waits"))["reason"] == "cancelled"
    assert [e["type"] for e in sink.of("waits")] == ["task.created", "task.cancelled"]
    backend.gate.set()
    assert (await sink.final("runs"))["type"] == "task.done"


async def test_cancel_by_session_end_and_by_epoch() -> None:
    backend = Gated()
    sink, pool = Sink(), WorkerPool(backend)
    pool.submit(ctx("a1"), sink, epoch=0)
    pool.submit(ctx("a2"), sink, epoch=1)
    pool.submit(ctx("b1", session="s2"), sink, epoch=0)
    assert pool.cancel_stale("s1", epoch=1) == 1
    assert (await sink.final("a1"))["reason"] == "barge_in"
    assert pool.cancel_session("s1") == 1
    assert (await sink.final("a2"))["reason"] == "session_end"
    backend.gate.set()
    assert (await sink.final("b1"))["type"] == "task.done"


async def test_a_failing_sink_does_not_break_the_task() -> None:
    seen: list[str] = []

    def flaky(event: dict[str, Any]) -> None:
        seen.append(event["type"])
        if event["type"] == "task.delta":
            raise RuntimeError("client went away")

    pool = WorkerPool(Steps(["a", "b"]))
    pool.submit(ctx("t1"), flaky)
    await asyncio.wait_for(pool._jobs["t1"].task, WAIT_S)
    assert seen == ["task.created", "task.delta", "task.delta", "task.done"]


async def test_close_cancels_everything() -> None:
    sink, pool = Sink(), WorkerPool(Hanging())
    pool.submit(ctx("t1"), sink)
    pool.submit(ctx("t2", session="s2"), sink)
    await asyncio.wait_for(pool.close(), WAIT_S)
    assert {e["reason"] for e in sink.events if e["type"] == "task.cancelled"} == {"shutdown"}
    assert pool.active() == 0


async def test_duplicate_task_id_is_refused() -> None:
    backend = Gated()
    sink, pool = Sink(), WorkerPool(backend)
    pool.submit(ctx("t1"), sink)
    with pytest.raises(TaskRejected, match="already running"):
        pool.submit(ctx("t1"), sink)
    backend.gate.set()
    await sink.final("t1")


class SeesTools:
    """Reports the client tools its registry sees inside the task, after a yield to the other tasks."""

    name = "sees-tools"

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        await asyncio.sleep(0.01)  # the other task has set its own tools by now
        names = sorted(self.registry.client_tools())
        seen = [n for n in ("alpha", "beta") if n in self.registry]
        yield TaskResult(text=",".join(names), data={"in": seen})


async def test_client_tools_are_seen_only_inside_their_own_task() -> None:
    async def nothing() -> str:
        return ""

    def tool(name: str) -> Tool:
        return Tool(name, f"the {name} tool", {"type": "object"}, nothing)

    registry = default_registry()
    sink, pool = Sink(), WorkerPool(SeesTools(registry))
    pool.submit(ctx("a", session="s1"), sink, tools={"alpha": tool("alpha")})
    pool.submit(ctx("b", session="s2"), sink, tools={"beta": tool("beta")})
    pool.submit(ctx("c", session="s3"), sink)
    results = {t: (await sink.final(t))["result"] for t in ("a", "b", "c")}
    assert results == {
        "a": {"text": "alpha", "in": ["alpha"]},
        "b": {"text": "beta", "in": ["beta"]},
        "c": {"text": "", "in": []},
    }
    assert "alpha" not in registry and not registry.client_tools(), "the test's own context sees none"
    with pytest.raises(ToolError, match="unknown tool 'alpha'"):
        registry.get("alpha")
