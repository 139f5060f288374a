"""Background model backends: `local` (offline tool runner) and `openai` (chat-completions endpoint)."""

from .base import Backend, TaskDelta, TaskEvent, TaskResult
from .local import LocalBackend
from .openai_backend import OpenAIBackend, OpenAIBackendConfig

__all__ = [
    "Backend",
    "LocalBackend",
    "OpenAIBackend",
    "OpenAIBackendConfig",
    "TaskDelta",
    "TaskEvent",
    "TaskResult",
]
