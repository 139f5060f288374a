"""The background model: context package, tools, backends, worker pool and result scheduling.

One pool per process; server/background_service.py wires it to live sessions:

    registry = default_registry()
    pool = WorkerPool(make_backend("local", registry), PoolConfig())
    pool.submit(record.build(task, registry.specs()), emit=outbound_queue.put_nowait)

`model/` is never imported here and nothing here touches tensors or sockets.
"""

from __future__ import annotations

from typing import Literal

from .backends import (
    Backend,
    LocalBackend,
    OpenAIBackend,
    OpenAIBackendConfig,
    TaskDelta,
    TaskEvent,
    TaskResult,
)
from .context import (
    SCHEMA_VERSION,
    ContextPackage,
    ConversationItem,
    ConversationRecord,
    MediaRef,
    TaskSpec,
    ToolSpec,
)
from .pool import PoolConfig, TaskRejected, WorkerPool
from .scheduling import Piece, ResultScheduler
from .tools import Tool, ToolError, ToolRegistry, default_registry


def make_backend(
    kind: Literal["local", "openai"], registry: ToolRegistry, openai: OpenAIBackendConfig | None = None
) -> Backend:
    """The backend named in settings: `local` (offline tools) or `openai` (an OpenAI-compatible endpoint)."""
    if kind == "local":
        return LocalBackend(registry)
    if kind == "openai":
        return OpenAIBackend(openai or OpenAIBackendConfig(), registry)
    raise ValueError(f"unknown background backend {kind!r}; use 'local' or 'openai'")


__all__ = [
    "SCHEMA_VERSION",
    "Backend",
    "ContextPackage",
    "ConversationItem",
    "ConversationRecord",
    "LocalBackend",
    "MediaRef",
    "OpenAIBackend",
    "OpenAIBackendConfig",
    "Piece",
    "PoolConfig",
    "ResultScheduler",
    "TaskDelta",
    "TaskEvent",
    "TaskRejected",
    "TaskResult",
    "TaskSpec",
    "Tool",
    "ToolError",
    "ToolRegistry",
    "ToolSpec",
    "WorkerPool",
    "default_registry",
    "make_backend",
]
