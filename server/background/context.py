"""The context package handed to a background worker, and the record that builds it.

Contract: a `ContextPackage` is everything a background backend may know about the
live session when a task starts - a versioned pydantic model that serialises to
JSON, so a worker in another process or behind an HTTP endpoint gets the same
thing. `ConversationRecord` is the per-session, bounded, append-only log that the
session writes to as the conversation runs (user text, model text deltas merged
into turns, task results); `build()` snapshots it into a package, so a later
task's package holds the results of earlier ones. The package's `media` field
references input chunks by id and timestamp, never by bytes; the record adds none.

It does not know about sockets, tokens, tensors or the worker pool; times are
wall-clock seconds from an injectable clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1  # bump on any breaking change to ContextPackage's fields
MAX_RECORD_ITEMS = 2_000  # conversation items kept per session; the oldest fall off (sessions never end)
MAX_TURN_CHARS = 4_000  # a model turn longer than this continues in a new item

Role = Literal["user", "model", "task", "system"]
Scheduling = Literal["interrupt", "when_idle", "silent"]
Origin = Literal["client", "model", "tool_call"]


class ConversationItem(BaseModel):
    """One entry of the conversation, in the order it happened."""

    role: Role = Field(
        description="who produced it: the user, the interaction model, a background task, the server"
    )
    text: str = Field(description="the text of the entry; a model turn is its text-out deltas joined")
    source: str = Field(
        description="how it arrived: 'text' (typed by the user), 'model_text' (interaction model "
        "text-out), 'transcript' (what the model heard the user say), 'task_result' / 'task_error' (a "
        "background task's outcome), 'instructions'"
    )
    started_at: float = Field(description="wall-clock seconds (Unix time) of the first text of this entry")
    ended_at: float = Field(description="wall-clock seconds of the last text added to this entry")
    task_id: str | None = Field(default=None, description="the task this entry belongs to, for role 'task'")
    item_id: str | None = Field(
        default=None, description="the OpenAI conversation item it is (truncate and delete find it by this)"
    )


class MediaRef(BaseModel):
    """A reference to a recent input chunk the session holds; the bytes stay in the session."""

    kind: Literal["audio", "image"] = Field(
        description="'audio': a 200 ms input chunk; 'image': a camera frame"
    )
    ref_id: str = Field(description="session-local id the session can resolve to bytes while it keeps them")
    pts_ms: int = Field(description="presentation timestamp from the client's binary frame, in milliseconds")
    received_at: float = Field(description="wall-clock seconds when the server received it")


class ToolSpec(BaseModel):
    """A tool the worker may call, as declared to it."""

    name: str = Field(description="unique tool name, [a-zA-Z0-9_-]")
    description: str = Field(description="what the tool does, for the background model to choose it")
    parameters: dict[str, Any] = Field(description="JSON schema (type 'object') of the tool's arguments")
    background: bool = Field(
        default=False, description="True when a call to it from the live model runs as a background task"
    )


class TaskSpec(BaseModel):
    """The task the worker is asked to do."""

    task_id: str = Field(description="server-assigned id, as in task.created / task.delta events")
    input: str = Field(description="the task text: the client's input, the model's marker text, or the call")
    scheduling: Scheduling = Field(
        description="how results join the live stream: 'interrupt' next micro-turn, 'when_idle' after the "
        "model stops speaking, 'silent' context only"
    )
    tool: str | None = Field(
        default=None, description="a tool the task must use directly, or None to let the backend choose"
    )
    arguments: dict[str, Any] | None = Field(default=None, description="arguments for `tool`, when given")
    origin: Origin = Field(
        description="who started it: the client (task.create), the model (task marker), or "
        "a background tool call"
    )
    created_at: float = Field(description="wall-clock seconds when the task was created")


class ContextPackage(BaseModel):
    """Everything a background worker gets for one task (schema version 1)."""

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="version of this schema")
    session_id: str = Field(description="the live session the task belongs to")
    instructions: str = Field(default="", description="the session instructions (session.update)")
    conversation: list[ConversationItem] = Field(
        default_factory=list, description="the conversation so far, oldest first, both sides and task results"
    )
    media: list[MediaRef] = Field(
        default_factory=list, description="recent audio chunks and frames, oldest first"
    )
    task: TaskSpec = Field(description="the task to do")
    tools: list[ToolSpec] = Field(default_factory=list, description="the tools declared for this task")
    created_at: float = Field(description="wall-clock seconds when the package was built")


class ConversationRecord:
    """Per-session log of the conversation; the session appends, `build()` snapshots."""

    def __init__(self, session_id: str, clock: Callable[[], float] = time.time) -> None:
        self.session_id = session_id
        self._clock = clock
        self._items: deque[ConversationItem] = deque(maxlen=MAX_RECORD_ITEMS)
        self._model_turn_open = False

    def add_user_text(self, text: str, source: str = "text", item_id: str | None = None) -> None:
        """A user message (typed text or a transcript); it also closes any open model turn."""
        self._model_turn_open = False
        now = self._clock()
        self._items.append(
            ConversationItem(role="user", text=text, source=source, started_at=now, ended_at=now,
                             item_id=item_id)
        )

    def add_text(self, role: Role, text: str, item_id: str | None = None) -> None:
        """A whole message the client placed in the conversation (system or assistant text)."""
        self._model_turn_open = False
        now = self._clock()
        source = "model_text" if role == "model" else "instructions"
        self._items.append(ConversationItem(role=role, text=text, source=source, started_at=now, ended_at=now,
                                            item_id=item_id))

    def add_model_text(self, delta: str, item_id: str | None = None) -> None:
        """A text-out delta of the interaction model, merged into the current model turn (the item
        `item_id` when given: a response's deltas are one item)."""
        if not delta:
            return
        now = self._clock()
        last = self._items[-1] if self._items else None
        same = item_id is not None and last is not None and last.item_id == item_id
        if item_id is None:
            same = self._model_turn_open
        fits = last is not None and last.role == "model" and len(last.text) + len(delta) <= MAX_TURN_CHARS
        if same and fits and last is not None:
            last.text += delta
            last.ended_at = now
            return
        self._items.append(ConversationItem(role="model", text=delta, source="model_text", started_at=now,
                                            ended_at=now, item_id=item_id))
        self._model_turn_open = True

    def set_item_text(self, item_id: str, text: str) -> None:
        """The item's text is now `text` (a truncated reply: only what the user heard); its parts, when a
        long turn was split, are cut in order."""
        for item in self._items:
            if item.item_id == item_id:
                item.text, text = text[: len(item.text)], text[len(item.text):]

    def delete_item(self, item_id: str) -> None:
        self._items = deque((i for i in self._items if i.item_id != item_id), maxlen=MAX_RECORD_ITEMS)

    def end_model_turn(self) -> None:
        """The model stopped speaking: its next delta starts a new turn."""
        self._model_turn_open = False

    def add_task_result(self, task_id: str, text: str, ok: bool = True) -> None:
        """A background task's final result (ok) or its error message."""
        self._model_turn_open = False
        now = self._clock()
        source = "task_result" if ok else "task_error"
        self._items.append(
            ConversationItem(
                role="task", text=text, source=source, started_at=now, ended_at=now, task_id=task_id
            )
        )

    @property
    def items(self) -> list[ConversationItem]:
        return list(self._items)

    def build(self, task: TaskSpec, tools: list[ToolSpec], instructions: str = "") -> ContextPackage:
        """Snapshot the record into a context package for `task` (items are copied, not shared)."""
        return ContextPackage(
            session_id=self.session_id,
            instructions=instructions,
            conversation=[item.model_copy() for item in self._items],
            task=task,
            tools=list(tools),
            created_at=self._clock(),
        )
