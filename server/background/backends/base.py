"""The interface every background backend implements.

Contract: `Backend.run(ctx)` is an async iterator over `TaskEvent`s for one task:
any number of `TaskDelta` (partial text, in order), then at most one
`TaskResult` (the final answer), after which it stops. A backend that stops
without a `TaskResult` is taken to have answered with its deltas joined. A
backend raises to fail the task; it is cancelled (its generator closed) on
timeout, `task.cancel`, barge-in or session end, so it must not swallow
`asyncio.CancelledError`. It must never block the event loop.

It does not know about sessions, pools, client events or scheduling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..context import ContextPackage


@dataclass(frozen=True)
class TaskDelta:
    text: str  # a partial result; the client gets it as task.delta.delta.text


@dataclass(frozen=True)
class TaskResult:
    text: str  # the final answer; the client gets it as task.done.result.text
    data: dict[str, Any] = field(default_factory=dict)  # extra JSON fields merged into task.done.result


TaskEvent = TaskDelta | TaskResult


class Backend(Protocol):
    name: str  # short id used in logs, metrics and settings ("local", "openai")

    def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]: ...
