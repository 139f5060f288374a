"""Test helper: the event sink a session gives the worker pool, with a wait for a task's last event."""

from __future__ import annotations

import asyncio
from typing import Any

WAIT_S = 10.0  # upper bound on waiting for an event; a correct pool answers far sooner


class Sink:
    """Collects emitted events and lets a test wait for a task's last one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["task_id"] == task_id]

    def types(self, task_id: str) -> list[str]:
        return [e["type"] for e in self.of(task_id)]

    async def final(self, task_id: str) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            while True:
                last = self.of(task_id)[-1:]
                if last and last[0]["type"] in ("task.done", "task.error", "task.cancelled"):
                    return last[0]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), WAIT_S)
