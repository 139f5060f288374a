"""The background worker pool: runs tasks on the asyncio loop and reports their events.

Contract: `WorkerPool.submit(ctx, emit, ...)` starts one asyncio task that drives
`backend.run(ctx)` and calls `emit(event)` (a plain, non-blocking callable the
session gives) with these client events (docs/architecture.md), in this order:

    {"type": "task.created",   "task_id": id, "task": {"input", "scheduling", "tool", "origin"}}
    {"type": "task.delta",     "task_id": id, "seq": 0, 1, ..., "delta": {"text": str}}
    then exactly one of
    {"type": "task.done",      "task_id": id, "result": {"text": str, ...backend data}}
    {"type": "task.error",     "task_id": id, "error": {"code": str, "message": str}}
    {"type": "task.cancelled", "task_id": id, "reason": str}

`task.created` is emitted before `submit` returns. `tools` (the session's
client-declared tools) are seen by the backend's registry inside that task only. Error codes: `timeout` (the
task ran past its timeout, counted from submit), `tool_error` (a tool refused
or failed), `backend_error` (the backend raised). A request over the session's
limit (`task_limit`), over the pool's waiting bound (`pool_full`) or with a
non-positive timeout (`invalid_timeout`) is refused by `submit` raising
`TaskRejected` before anything is emitted. A backend that swallows its
cancellation still ends as `task.cancelled`; its late answer is not delivered.

Concurrency is bounded globally (`max_concurrent` running; others wait in FIFO
order for a slot) and per session (`max_per_session` waiting + running). A task
is cancelled by id, by session, or by epoch (barge-in: tasks started before the
new epoch); a backend that raises or hangs fails only its own task. Nothing here
blocks the loop or waits on a task; it does not know about sockets, the record,
or how results are spoken.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend, TaskDelta, TaskResult
from .context import ContextPackage
from .tools import Tool, ToolError, session_tools

log = logging.getLogger(__name__)

_LAST_EVENTS = ("task.done", "task.error", "task.cancelled")
Emit = Callable[[dict[str, Any]], None]


@dataclass
class PoolConfig:
    max_concurrent: int = 16  # tasks running at once, all sessions together
    max_per_session: int = 4  # tasks waiting or running per session; more is refused with `task_limit`
    max_waiting: int = 256  # tasks waiting for a slot, all sessions; more is refused with `pool_full`
    default_timeout_s: float = 60.0  # per task, from submit to its last event, when the request names none
    max_timeout_s: float = 600.0  # upper bound of a requested timeout


class TaskRejected(Exception):
    """The pool refused a task; `code` and the message go into a task.error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Job:
    task_id: str
    session_id: str
    epoch: int  # session epoch when the task was created
    emit: Emit
    task: asyncio.Task[None] | None = None
    running: bool = False  # holds a global slot
    cancel_reason: str | None = None
    ended: bool = False  # its last event (done / error / cancelled) was emitted


def new_task_id() -> str:
    return f"task_{uuid.uuid4().hex[:12]}"


class WorkerPool:
    """Bounded, cancellable background tasks on the running event loop."""

    def __init__(self, backend: Backend, config: PoolConfig | None = None) -> None:
        self.backend = backend
        self.config = config or PoolConfig()
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self._jobs: dict[str, _Job] = {}

    def submit(
        self,
        ctx: ContextPackage,
        emit: Emit,
        *,
        epoch: int = 0,
        timeout_s: float | None = None,
        backend: Backend | None = None,
        created_extra: dict[str, Any] | None = None,
        tools: Mapping[str, Tool] | None = None,
    ) -> str:
        """Start `ctx.task`; return its id (ctx.task.task_id). Raises `TaskRejected` over a limit."""
        task_id, session_id = ctx.task.task_id, ctx.session_id
        if task_id in self._jobs:
            raise TaskRejected("duplicate_task", f"task {task_id} is already running")
        if timeout_s is not None and timeout_s <= 0:
            raise TaskRejected("invalid_timeout", f"timeout_s must be positive, not {timeout_s}")
        if self.active(session_id) >= self.config.max_per_session:
            raise TaskRejected(
                "task_limit",
                f"this session already has {self.config.max_per_session} background "
                "tasks running or waiting; wait for one to finish or cancel one",
            )
        if self.active() >= self.config.max_concurrent + self.config.max_waiting:
            raise TaskRejected("pool_full", "the background pool is full; try again shortly")
        timeout = min(timeout_s or self.config.default_timeout_s, self.config.max_timeout_s)
        job = _Job(task_id=task_id, session_id=session_id, epoch=epoch, emit=emit)
        self._jobs[task_id] = job
        task = ctx.task
        self._emit(
            job,
            {
                "type": "task.created",
                "task_id": task_id,
                **(created_extra or {}),
                "task": {
                    "input": task.input,
                    "scheduling": task.scheduling,
                    "tool": task.tool,
                    "origin": task.origin,
                },
            },
        )
        job.task = asyncio.get_running_loop().create_task(
            self._run(job, ctx, backend or self.backend, timeout, tools or {}), name=f"background:{task_id}"
        )
        job.task.add_done_callback(lambda _: self._finish(job))
        return task_id

    def cancel(self, task_id: str, reason: str = "cancelled") -> bool:
        """Cancel one task; False when no such task is active (finished or unknown)."""
        job = self._jobs.get(task_id)
        if job is None or job.task is None or job.task.done() or job.cancel_reason is not None:
            return False
        job.cancel_reason = reason
        job.task.cancel()
        return True

    def cancel_session(self, session_id: str, reason: str = "session_end") -> int:
        """Cancel all of a session's tasks; returns how many."""
        ids = [j.task_id for j in self._jobs.values() if j.session_id == session_id]
        return sum(self.cancel(task_id, reason) for task_id in ids)

    def cancel_stale(self, session_id: str, epoch: int, reason: str = "barge_in") -> int:
        """Cancel a session's tasks created in an epoch before `epoch`; returns how many."""
        ids = [j.task_id for j in self._jobs.values() if j.session_id == session_id and j.epoch < epoch]
        return sum(self.cancel(task_id, reason) for task_id in ids)

    def active(self, session_id: str | None = None) -> int:
        """Tasks waiting or running, for one session or all."""
        return sum(1 for j in self._jobs.values() if session_id is None or j.session_id == session_id)

    def running(self) -> int:
        return sum(1 for j in self._jobs.values() if j.running)

    def waiting(self) -> int:
        """Tasks beyond the global slots (slots are handed out in submit order)."""
        return max(0, self.active() - self.config.max_concurrent)

    async def close(self) -> None:
        """Cancel every task and wait until all have emitted their last event."""
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        for task_id in list(self._jobs):
            self.cancel(task_id, "shutdown")
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self, job: _Job, ctx: ContextPackage, backend: Backend, timeout_s: float, tools: Mapping[str, Tool]
    ) -> None:
        session_tools.set(tools)  # this task's own context: its backend's registry sees the session's tools
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                async with self._slots:
                    job.running = True
                    result = await self._drive(job, ctx, backend)
            if job.cancel_reason is not None:
                # the backend swallowed the cancellation; its late answer is not delivered
                self._finish(job)
                return
            self._emit(
                job,
                {"type": "task.done", "task_id": job.task_id, "result": {**result.data, "text": result.text}},
            )
        except asyncio.CancelledError:
            self._finish(job)
            raise
        except TimeoutError as exc:
            if deadline.expired():
                self._error(job, "timeout", f"the task did not finish within {timeout_s:g} s")
            else:
                self._error(job, "backend_error", f"TimeoutError: {exc}")
        except ToolError as exc:
            self._error(job, "tool_error", str(exc))
        except Exception as exc:
            log.warning("background task %s failed in backend %s", job.task_id, backend.name, exc_info=True)
            self._error(job, "backend_error", f"{type(exc).__name__}: {exc}")
        finally:
            job.running = False

    async def _drive(self, job: _Job, ctx: ContextPackage, backend: Backend) -> TaskResult:
        seq = 0
        parts: list[str] = []
        events = backend.run(ctx)
        try:
            async for event in events:
                if isinstance(event, TaskResult):
                    return event
                if isinstance(event, TaskDelta) and event.text:
                    parts.append(event.text)
                    self._emit(
                        job,
                        {
                            "type": "task.delta",
                            "task_id": job.task_id,
                            "seq": seq,
                            "delta": {"text": event.text},
                        },
                    )
                    seq += 1
        finally:
            # an async generator backend gets its `finally` blocks run (streams closed) right away
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        return TaskResult(text="".join(parts))

    def _finish(self, job: _Job) -> None:
        """A job ending without its last event was cancelled (maybe before it started)."""
        if not job.ended:
            reason = job.cancel_reason or "cancelled"
            self._emit(job, {"type": "task.cancelled", "task_id": job.task_id, "reason": reason})

    def _error(self, job: _Job, code: str, message: str) -> None:
        self._emit(
            job, {"type": "task.error", "task_id": job.task_id, "error": {"code": code, "message": message}}
        )

    def _emit(self, job: _Job, event: dict[str, Any]) -> None:
        if event["type"] in _LAST_EVENTS:
            # forget it before telling the session, so a limit freed by this event is free in the callback
            job.ended = True
            self._jobs.pop(job.task_id, None)
        try:
            job.emit(event)
        except Exception:
            # the session's sink failing must not take the task (or the pool) down with it
            log.exception("emitting %s for background task %s failed", event["type"], job.task_id)
