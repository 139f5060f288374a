"""One session's side of the background model: record, tasks, and text-in scheduling.

Contract: a `SessionTasks` per live session joins the pieces: the session writes
the conversation into `record`, starts tasks with `submit` (from `task.create`,
a model task marker, or a background tool call), cancels with `cancel`, moves
the epoch on a barge-in with `barge_in`, asks each tick for background text with
`take_text_in`, and calls `close` at session end. Every task event goes to the
`send` callable the session gives (to be written to the client as is), and on
the way it is also:

- recorded: a task's final result (or error) joins the conversation record, so
  later tasks' context packages hold it;
- scheduled: each `task.delta` text is queued for the text-in slots under the
  task's scheduling; a `task.done` text is queued only when the task streamed
  no deltas (the deltas already carried it); cancelled tasks' waiting text is
  dropped. With `text_in="result"` no delta is queued, only the final result: its
  `brief` form when the backend gave one (the clock's "2:43"), else the tool's output
  when it is a non-empty string (e.g. "36300"), else the result text.

Client tools: a tool the client declared that the server registry lacks runs on
the client, OpenAI Realtime style. A task calling it sends
`response.function_call_arguments.done {task_id, call_id, name, arguments}` and
waits (within the task's timeout; a cancelled task stops waiting) until the
client answers with a `function_call_output` item for that `call_id`
(`function_call_output` here).

Refusals (over a limit, unknown tool) are sent as a `task.error` for a fresh
task id with no `task.created` before it. No sockets, tokenizer or tensors.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .context import ConversationRecord, Origin, Scheduling, TaskSpec, ToolSpec
from .pool import Emit, TaskRejected, WorkerPool, new_task_id
from .scheduling import Piece, ResultScheduler
from .tools import Tool, ToolRegistry

SCHEDULINGS: tuple[str, ...] = get_args(Scheduling)
TextIn = Literal["stream", "result"]  # a task's streamed steps enter text-in, or only its final result


@dataclass
class _Task:
    scheduling: Scheduling
    streamed: bool = False  # a task.delta was queued for text-in


class SessionTasks:
    """Background tasks of one session, wired to its record and text-in scheduler."""

    def __init__(
        self,
        session_id: str,
        pool: WorkerPool,
        registry: ToolRegistry,
        send: Emit,
        clock: Callable[[], float] = time.time,
        text_in: TextIn = "stream",
    ) -> None:
        self.session_id = session_id
        self.text_in = text_in
        self.pool = pool
        self.registry = registry
        self.send = send
        self.clock = clock
        self.record = ConversationRecord(session_id, clock)
        self.scheduler = ResultScheduler()
        self.instructions = ""  # session instructions (session.update), passed to every context package
        # tools the client declared (session.update), offered to workers beside the registry's
        self.client_tools: list[ToolSpec] = []
        self.epoch = 0  # the session's barge-in epoch
        self._tasks: dict[str, _Task] = {}
        self._client_calls: dict[str, asyncio.Future[str]] = {}  # call_id -> the client's output

    def submit(
        self,
        text: str,
        scheduling: Scheduling = "when_idle",
        *,
        tool: str | None = None,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        origin: Origin = "client",
        client_event_id: str | None = None,
    ) -> str | None:
        """Start a task; its id, or None when refused (a task.error was sent). Bad scheduling: ValueError."""
        if scheduling not in SCHEDULINGS:
            raise ValueError(f"scheduling must be one of {', '.join(SCHEDULINGS)}, not {scheduling!r}")
        task_id = new_task_id()
        extra = {"client_event_id": client_event_id} if client_event_id else {}
        on_client = self._client_tools(task_id)
        if tool is not None and tool not in self.registry and tool not in on_client:
            self._refuse(task_id, "unknown_tool", f"no background tool named {tool!r}", extra)
            return None
        spec = TaskSpec(
            task_id=task_id,
            input=text,
            scheduling=scheduling,
            tool=tool,
            arguments=arguments,
            origin=origin,
            created_at=self.clock(),
        )
        ctx = self.record.build(spec, self.registry.specs() + self.client_tools, self.instructions)
        self._tasks[task_id] = _Task(scheduling)
        try:
            self.pool.submit(ctx, self._on_event, epoch=self.epoch, timeout_s=timeout_s, created_extra=extra,
                             tools=on_client)
        except TaskRejected as exc:
            del self._tasks[task_id]
            self._refuse(task_id, exc.code, exc.message, extra)
            return None
        return task_id

    def function_call_output(self, call_id: str, output: str) -> bool:
        """The client's answer to a client tool call; False when no call with that id is waiting."""
        waiting = self._client_calls.get(call_id)
        if waiting is None or waiting.done():
            return False
        waiting.set_result(output)
        return True

    def _client_tools(self, task_id: str) -> dict[str, Tool]:
        """The declared tools the registry lacks, as tools that ask this session's client."""
        return {
            spec.name: Tool(spec.name, spec.description, spec.parameters,
                            functools.partial(self._call_client, task_id, spec.name))
            for spec in self.client_tools if spec.name not in self.registry
        }

    async def _call_client(self, task_id: str, name: str, **arguments: Any) -> str:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._client_calls[call_id] = answer
        self.send({"type": "response.function_call_arguments.done", "task_id": task_id, "call_id": call_id,
                   "item_id": f"item_{call_id[5:]}", "output_index": 0, "name": name,
                   "arguments": json.dumps(arguments)})
        try:
            return await answer
        finally:
            del self._client_calls[call_id]

    def cancel(self, task_id: str, reason: str = "cancelled") -> bool:
        """Cancel one of this session's tasks; False when it is not active (the client gets an error)."""
        if task_id not in self._tasks:
            return False
        return self.pool.cancel(task_id, reason)

    def barge_in(self, epoch: int, cancel_tasks: bool = False) -> None:
        """The user barged in and the session epoch is now `epoch`: waiting when_idle text goes stale.

        Running tasks go on (their later results are still spoken) unless `cancel_tasks`.
        """
        self.epoch = epoch
        if cancel_tasks:
            self.pool.cancel_stale(self.session_id, epoch, "barge_in")

    def take_text_in(
        self, model_speaking: bool, budget: int, measure: Callable[[str], int] = len
    ) -> list[Piece]:
        """Background text for this tick's text-in slots (mark it with the background source)."""
        return self.scheduler.take(model_speaking, self.epoch, budget, measure)

    def close(self, reason: str = "session_end") -> int:
        """Cancel all of this session's tasks; returns how many were cancelled."""
        return self.pool.cancel_session(self.session_id, reason)

    def _refuse(self, task_id: str, code: str, message: str, extra: dict[str, Any]) -> None:
        self.send(
            {"type": "task.error", "task_id": task_id, **extra, "error": {"code": code, "message": message}}
        )

    @staticmethod
    def _result_text_in(result: dict[str, Any]) -> str:
        for key in ("brief", "output"):
            if isinstance(result.get(key), str) and result[key]:
                return result[key]
        return result["text"]

    def _on_event(self, event: dict[str, Any]) -> None:
        task_id = event["task_id"]
        state = self._tasks.get(task_id)
        kind = event["type"]
        if state is not None and kind == "task.delta" and self.text_in == "stream":
            self.scheduler.push(task_id, event["delta"]["text"], state.scheduling, self.epoch)
            state.streamed = True
        elif state is not None and kind == "task.done":
            text = event["result"]["text"]
            self.record.add_task_result(task_id, text)
            if not state.streamed:
                spoken = self._result_text_in(event["result"]) if self.text_in == "result" else text
                self.scheduler.push(task_id, spoken, state.scheduling, self.epoch, final=True)
        elif kind == "task.error":
            self.record.add_task_result(task_id, event["error"]["message"], ok=False)
        elif kind == "task.cancelled":
            self.scheduler.drop_task(task_id)
        if kind in ("task.done", "task.error", "task.cancelled"):
            self._tasks.pop(task_id, None)
        self.send(event)
