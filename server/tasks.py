"""Background work inside a live session: the bridge between `Session` and server/background.

One `BackgroundWork` per server owns the worker pool and the tool registry and
makes a `SessionBackground` per session. That object is the session's
`TaskHooks`: it turns `task.create` / `task.cancel` into pool work, starts the
tasks the model's text-out markers name (`SlotOutput.task_texts`) too, writes
both sides of the conversation into the record that context packages are
built from, moves the epoch on barge-in, and each tick moves scheduled result
text (interrupt / when_idle / silent) into the session's text-in queue. Task
events go to the client as they are.

Everything here runs on the event loop and never waits on a worker; the tick
thread only reads the session's text-in queue. No tensors, no sockets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..model.slots import SlotOutput
from ..model.tokenizer import ByteTokenizer
from . import protocol as p
from .background import (
    Backend,
    OpenAIBackendConfig,
    PoolConfig,
    SessionTasks,
    ToolSpec,
    WorkerPool,
    default_registry,
    make_backend,
)
from .background.knowledge import default_knowledge
from .errors import ErrorCode, ProtocolError
from .settings import ServerSettings

if TYPE_CHECKING:
    from .metrics import Metrics
    from .session import Session

log = logging.getLogger(__name__)

BACKGROUND_QUEUE_TURNS = 2  # scheduled text held in the session's text-in queue, in micro-turns of slots


class SessionBackground:
    """`TaskHooks` of one session (see server/session.py)."""

    def __init__(
        self, session: Session, tasks: SessionTasks, tokenizer: ByteTokenizer, text_in_slots: int,
        metrics: Metrics | None,
    ) -> None:
        self.session = session
        self.tasks = tasks
        self._tokenizer = tokenizer
        self._budget = BACKGROUND_QUEUE_TURNS * text_in_slots
        self._metrics = metrics
        self._model_was_speaking = False

    # --- client events ---
    async def create(self, session: Session, event: p.TaskCreate) -> None:
        spec = event.task
        try:
            self.tasks.submit(
                spec.input, spec.scheduling, tool=spec.tool, timeout_s=spec.timeout_s,
                client_event_id=event.event_id,
            )
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_EVENT, str(exc), event.event_id, "task.scheduling") from exc

    async def cancel(self, session: Session, event: p.TaskCancel) -> None:
        if not self.tasks.cancel(event.task_id):
            raise ProtocolError(
                ErrorCode.UNKNOWN_TASK, f"no running task {event.task_id!r} in this session", event.event_id,
                "task_id",
            )

    async def close(self, session: Session) -> None:
        self.tasks.close()

    # --- session hooks ---
    def set_instructions(self, instructions: str) -> None:
        self.tasks.instructions = instructions

    def set_tools(self, tools: list[ToolSpec]) -> None:
        self.tasks.client_tools = tools

    def function_call_output(self, call_id: str, output: str) -> bool:
        return self.tasks.function_call_output(call_id, output)

    def on_user_text(self, text: str) -> None:
        self.tasks.record.add_user_text(text)

    def on_barge_in(self, epoch: int) -> None:
        self.tasks.barge_in(epoch)

    def on_turn(self, out: SlotOutput, model_speaking: bool) -> None:
        """Once per tick: model text into the record, model task markers, scheduled results into text-in."""
        if out.text:
            self.tasks.record.add_model_text(out.text)
        if self._model_was_speaking and not model_speaking:
            self.tasks.record.end_model_turn()
        self._model_was_speaking = model_speaking
        for task_text in out.task_texts:
            # "name: input" where name is a declared background tool runs that tool (on the server when
            # its registry has it, else on the client); else free text
            name, _, rest = task_text.partition(":")
            tool = self._client_tool(name.strip())
            if tool is not None:
                self.tasks.submit(rest.strip() or task_text, "when_idle", tool=tool.name, origin="tool_call")
            else:
                self.tasks.submit(task_text, "when_idle", origin="model")
        room = self._budget - self.session.background_queued
        if room <= 0:
            return
        measure = self._measure
        for piece in self.tasks.take_text_in(model_speaking, room, measure):
            self.session.queue_background_text(piece.text, self.session.epoch)
            if self._metrics is not None:
                self._metrics.background_text_tokens.inc(measure(piece.text))

    def _measure(self, text: str) -> int:
        return len(self._tokenizer.encode(text)) + 1  # + the SRC_BACKGROUND marker

    def _client_tool(self, name: str | None) -> ToolSpec | None:
        return next((t for t in self.tasks.client_tools if t.name == name and t.background), None)


class BackgroundWork:
    """The process-wide pool + registry; call it with a session to get that session's hooks."""

    def __init__(self, settings: ServerSettings, tokenizer: ByteTokenizer, text_in_slots: int,
                 metrics: Metrics | None = None, backend: Backend | None = None) -> None:
        self.registry = default_registry()
        self._settings = settings
        self._tokenizer = tokenizer
        self._text_in_slots = text_in_slots
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

    def __call__(self, session: Session) -> SessionBackground:
        def send(event: dict) -> None:
            session.send(p.TaskEvent(**event))
            if self.metrics is not None:
                self.metrics.background_tasks.set(self.pool.active())

        tasks = SessionTasks(session.id, self.pool, self.registry, send=send,
                             text_in=self._settings.background_text_in)
        return SessionBackground(session, tasks, self._tokenizer, self._text_in_slots, self.metrics)

    async def warm(self) -> None:
        """Load the knowledge-search encoder now (in a thread): loading it on a first task would hold
        the GIL for seconds while sessions stream, stalling the tick thread."""
        if self._backend is None and self._settings.background_backend == "local":
            await asyncio.to_thread(default_knowledge().warm)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
