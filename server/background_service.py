"""Background work of live sessions: one `BackgroundService` per server, one `SessionBackground` each.

`BackgroundService` owns the worker pool and the tool registry, and opens the
`SessionBackground` of a session with `for_session(session_id, send)`. That object is
the only layer between a session and the pool. It owns:

- the conversation record context packages are built from: the session reports user
  text (`on_user_text`) and each micro-turn's model text (`on_model_turn`); a task's
  final result (or error) joins it, so later tasks' packages hold it;
- the task table: tasks start with `submit` (from `task.create`, a model task marker,
  or a background tool call) and stop with `cancel`, `barge_in(cancel_tasks=True)` or
  `close` at session end;
- client tool calls: a tool the client declared (`client_tools`) that the registry
  lacks runs on the client, OpenAI Realtime style. A task calling it sends
  `response.function_call_arguments.done {task_id, call_id, name, arguments}` and waits
  (within the task's timeout; a cancelled task stops waiting) until the client's
  `function_call_output` item for that `call_id` arrives (`function_call_output`);
- marker-started tasks: each task marker the model closed in a micro-turn
  (`SlotOutput.task_texts`, "name: input" for a declared background tool, else free
  text) starts a `when_idle` task;
- the text-in scheduling: each `task.delta` text is queued under the task's scheduling
  and a `task.done` text only when the task streamed no deltas; cancelled tasks'
  waiting text is dropped and a barge-in makes waiting `when_idle` text stale. With
  `text_in="result"` no delta is queued, only the final result: its `brief` form when
  the backend gave one (the clock's "2:43"), else the tool's output when it is a
  non-empty string (e.g. "36300"), else the result text. `on_model_turn` returns the
  text for this tick's text-in slots, at most the session's free room in its units.

Every task event goes to `send` as it is; refusals (over a limit, unknown tool) are a
`task.error` for a fresh task id with no `task.created` before it. Everything runs on
the event loop and never waits on a worker. It knows nothing about sockets, the tick
thread, the session's outbox or tensors.
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

from ..model.slots import SlotOutput
from ..model.tokenizer import ByteTokenizer
from . import server_events as ev
from .background import (
    Backend,
    ConversationRecord,
    OpenAIBackendConfig,
    Piece,
    PoolConfig,
    ResultScheduler,
    TaskRejected,
    TaskSpec,
    Tool,
    ToolRegistry,
    ToolSpec,
    WorkerPool,
    default_registry,
    make_backend,
)
from .background.context import Origin, Scheduling
from .background.knowledge import default_knowledge
from .background.pool import Emit, new_task_id
from .metrics import Metrics
from .settings import ServerSettings

SCHEDULINGS: tuple[str, ...] = get_args(Scheduling)
TextIn = Literal["stream", "result"]  # a task's streamed steps enter text-in, or only its final result


@dataclass
class _Task:
    scheduling: Scheduling
    streamed: bool = False  # a task.delta was queued for text-in


class SessionBackground:
    """The background tasks of one session, with its record, client tool calls and text-in schedule."""

    def __init__(
        self,
        session_id: str,
        pool: WorkerPool,
        registry: ToolRegistry,
        send: Emit,
        clock: Callable[[], float] = time.time,
        text_in: TextIn = "stream",
        measure: Callable[[str], int] = len,
        metrics: Metrics | None = None,
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
        self._measure = measure  # text-in units (the session's token slots) of a text
        self._metrics = metrics
        # sends a client tool call the OpenAI way (Responses.function_call) and returns its call_id; None: the
        # bare `response.function_call_arguments.done` event (sessions without a response lifecycle)
        self.on_function_call: Callable[[str, dict[str, Any], str], str] | None = None
        self._tasks: dict[str, _Task] = {}
        self._client_calls: dict[str, asyncio.Future[str]] = {}  # call_id -> the client's output

    # --- the session's conversation ---
    def on_user_text(self, text: str, item_id: str | None = None) -> None:
        self.record.add_user_text(text, item_id=item_id)

    def on_model_turn(self, out: SlotOutput, model_speaking: bool, room: int, item_id: str | None = None
                      ) -> list[str]:
        """Once per tick: record the model's text (as the response item `item_id`; None: outside any
        response, so not recorded), start the tasks its markers name, and return the background text for
        this tick's text-in slots (at most `room` units)."""
        if out.text and item_id is not None:
            self.record.add_model_text(out.text, item_id)
        for task_text in out.task_texts:
            name, _, rest = task_text.partition(":")
            tool = self._background_tool(name.strip())
            if tool is not None:
                self.submit(rest.strip() or task_text, "when_idle", tool=tool.name, origin="tool_call")
            else:
                self.submit(task_text, "when_idle", origin="model")
        if room <= 0:
            return []
        texts = [piece.text for piece in self.take_text_in(model_speaking, room, self._measure)]
        if self._metrics is not None:
            for text in texts:
                self._metrics.background_text_tokens.inc(self._measure(text))
        return texts

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
        """Background text pieces for this tick's text-in slots (marked with the background source)."""
        return self.scheduler.take(model_speaking, self.epoch, budget, measure)

    # --- tasks ---
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

    def cancel(self, task_id: str, reason: str = "cancelled") -> bool:
        """Cancel one of this session's tasks; False when it is not active (the client gets an error)."""
        if task_id not in self._tasks:
            return False
        return self.pool.cancel(task_id, reason)

    def close(self, reason: str = "session_end") -> int:
        """Cancel all of this session's tasks; returns how many were cancelled."""
        return self.pool.cancel_session(self.session_id, reason)

    # --- client tools ---
    def function_call_output(self, call_id: str, output: str) -> bool:
        """The client's answer to a client tool call; False when no call with that id is waiting."""
        waiting = self._client_calls.get(call_id)
        if waiting is None or waiting.done():
            return False
        waiting.set_result(output)
        return True

    def _background_tool(self, name: str) -> ToolSpec | None:
        return next((t for t in self.client_tools if t.name == name and t.background), None)

    def _client_tools(self, task_id: str) -> dict[str, Tool]:
        """The declared tools the registry lacks, as tools that ask this session's client."""
        return {
            spec.name: Tool(spec.name, spec.description, spec.parameters,
                            functools.partial(self._call_client, task_id, spec.name))
            for spec in self.client_tools if spec.name not in self.registry
        }

    async def _call_client(self, task_id: str, name: str, **arguments: Any) -> str:
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.on_function_call is not None:
            call_id = self.on_function_call(name, arguments, task_id)
        else:
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            self.send({"type": "response.function_call_arguments.done", "task_id": task_id,
                       "call_id": call_id, "item_id": f"item_{call_id[5:]}", "output_index": 0, "name": name,
                       "arguments": json.dumps(arguments)})
        self._client_calls[call_id] = answer
        try:
            return await answer
        finally:
            del self._client_calls[call_id]

    # --- task events ---
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


class BackgroundService:
    """The process-wide worker pool and tool registry; `for_session` opens a session's background."""

    def __init__(self, settings: ServerSettings, tokenizer: ByteTokenizer, metrics: Metrics | None = None,
                 backend: Backend | None = None) -> None:
        self.registry = default_registry()
        self._settings = settings
        self._tokenizer = tokenizer
        self.metrics = metrics  # set by the app when None
        self._backend = backend  # None: the one named in settings
        self._pool: WorkerPool | None = None

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:  # created lazily: the pool binds to the running event loop
            s = self._settings
            backend = self._backend or make_backend(s.background_backend, self.registry, OpenAIBackendConfig(
                base_url=s.background_openai_base_url, model=s.background_openai_model,
                api_key=s.background_openai_api_key,
            ))
            self._pool = WorkerPool(backend, PoolConfig(
                max_concurrent=s.background_max_concurrent, max_per_session=s.background_max_per_session,
                default_timeout_s=s.background_timeout_s,
            ))
        return self._pool

    def for_session(self, session_id: str, send: Callable[[ev.ServerEvent], None]) -> SessionBackground:
        """The background of a new session whose task events go out through `send`."""

        def send_task_event(event: dict[str, Any]) -> None:
            send(ev.TaskServerEvent(**event))
            if self.metrics is not None:
                self.metrics.background_tasks.set(self.pool.active())

        return SessionBackground(session_id, self.pool, self.registry, send_task_event,
                                 text_in=self._settings.background_text_in, measure=self._text_in_units,
                                 metrics=self.metrics)

    def _text_in_units(self, text: str) -> int:
        return len(self._tokenizer.encode(text)) + 1  # + the SRC_BACKGROUND marker

    async def warm(self) -> None:
        """Load the knowledge-search encoder now (in a thread): loading it on a first task would hold
        the GIL for seconds while sessions stream, stalling the tick thread."""
        if self._backend is None and self._settings.background_backend == "local":
            await asyncio.to_thread(default_knowledge().warm)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
