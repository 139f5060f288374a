"""Background backend for any OpenAI-compatible chat-completions endpoint.

Contract: `OpenAIBackend(config, registry).run(ctx)` sends the context package as
a system message (background-worker role + session instructions) and one user
message (the conversation transcript with timestamps, media references, the
task), streams the reply with the `openai` package's `AsyncOpenAI`, and yields
every content chunk as a `TaskDelta`. When the model calls tools, it gathers the
streamed call fragments, runs each call through the `ToolRegistry`, appends the
assistant tool-call message and the `tool` results, and asks again, up to
`max_tool_rounds` times. The final `TaskResult.text` is all content joined, with
the tool calls made listed in `data["tool_calls"]`. A tool failure is handed
back to the model as the tool's output; an endpoint failure raises.

Works with vLLM, SGLang, llama.cpp server and Ollama: one system message and
strictly alternating messages, so strict chat templates accept it. It does not
know about sessions, pools or scheduling; only tools present in both the package
and the registry are offered, once per name. The session's client-declared tools
are in the registry inside a pool task (`session_tools`), so they are offered and
a call to one goes to the client; its output is the `tool` message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from openai import AsyncOpenAI

from ..context import ContextPackage, ToolSpec
from ..tools import ToolError, ToolRegistry, openai_tool, output_text
from .base import TaskDelta, TaskEvent, TaskResult

WORKER_ROLE = (
    "You are the background model of a live voice assistant. The live model keeps talking with the user "
    "while you work on one task. Use the tools when they help. Answer the task briefly and plainly: your "
    "answer is read aloud into the conversation."
)


@dataclass
class OpenAIBackendConfig:
    base_url: str = "http://127.0.0.1:8001/v1"  # the endpoint's /v1 root (vLLM, SGLang, llama.cpp, Ollama)
    model: str = "default"  # model name as the endpoint knows it
    api_key: str = "none"  # local servers ignore it, but the client requires a value
    temperature: float = 0.2  # low: tasks want answers, not creativity
    max_tokens: int = 512  # per request
    max_tool_rounds: int = 4  # requests answered with tool calls before the task fails
    request_timeout_s: float = 60.0  # per HTTP request; the pool's task timeout bounds the whole task
    max_retries: int = 1  # client retries of a failed request


class OpenAIBackend:
    """Streams chat completions with tool calls; the scale-out backend."""

    name = "openai"

    def __init__(self, config: OpenAIBackendConfig, registry: ToolRegistry) -> None:
        self.config = config
        self.registry = registry
        self.client = AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key,
            timeout=config.request_timeout_s,
            max_retries=config.max_retries,
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": _system_text(ctx)},
            {"role": "user", "content": _user_text(ctx)},
        ]
        tools = [openai_tool(spec) for spec in _offered(ctx, self.registry)]
        content: list[str] = []
        calls_made: list[dict[str, Any]] = []
        for _ in range(self.config.max_tool_rounds + 1):
            round_text: list[str] = []
            calls: dict[int, dict[str, str]] = {}
            async for kind, value in self._stream(messages, tools):
                if kind == "text":
                    round_text.append(value)
                    yield TaskDelta(value)
                else:
                    _merge_call(calls, value)
            content += round_text
            if not calls:
                yield TaskResult(text="".join(content), data={"tool_calls": calls_made})
                return
            ordered = [calls[i] for i in sorted(calls)]
            messages.append(
                {
                    "role": "assistant",
                    "content": "".join(round_text) or None,
                    "tool_calls": [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                        }
                        for c in ordered
                    ],
                }
            )
            for call in ordered:
                output = await self._call_tool(call["name"], call["arguments"])
                calls_made.append({"name": call["name"], "arguments": call["arguments"], "output": output})
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        raise RuntimeError(f"the model asked for tools more than {self.config.max_tool_rounds} times")

    async def _stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> AsyncIterator[tuple[str, Any]]:
        """('text', str) for content chunks and ('call', fragment) for tool-call fragments."""
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        stream = await self.client.chat.completions.create(
            model=self.config.model,
            messages=messages,
            stream=True,
            temperature=self.config.temperature,
            max_tokens=self.config.max_tokens,
            **extra,
        )
        async with stream:
            async for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if delta.content:
                    yield "text", delta.content
                for fragment in delta.tool_calls or []:
                    yield "call", fragment

    async def _call_tool(self, name: str, arguments: str) -> str:
        try:
            return output_text(await self.registry.call(name, arguments))
        except ToolError as exc:
            return f"error: {exc}"


def _offered(ctx: ContextPackage, registry: ToolRegistry) -> list[ToolSpec]:
    """The package's tools the registry can call - its own and, inside a pool task, the session's client
    tools - once per name: a client tool named like a registered one runs on the server (the registry
    wins), and endpoints may refuse a request naming a tool twice."""
    offered: dict[str, ToolSpec] = {}
    for spec in ctx.tools:
        if spec.name in registry and spec.name not in offered:
            offered[spec.name] = spec
    return list(offered.values())


def _merge_call(calls: dict[int, dict[str, str]], fragment: Any) -> None:
    """Accumulate one streamed tool-call fragment (id and name come once, arguments in pieces)."""
    call = calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
    if fragment.id:
        call["id"] = fragment.id
    if fragment.function is not None:
        call["name"] += fragment.function.name or ""
        call["arguments"] += fragment.function.arguments or ""


def _clock_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M:%S")


def _system_text(ctx: ContextPackage) -> str:
    if not ctx.instructions:
        return WORKER_ROLE
    return f"{WORKER_ROLE}\n\nThe live session's instructions:\n{ctx.instructions}"


def _user_text(ctx: ContextPackage) -> str:
    lines = ["Conversation so far (UTC times):"]
    for item in ctx.conversation:
        who = (
            f"task {item.task_id} {'result' if item.source == 'task_result' else 'error'}"
            if item.role == "task"
            else item.role
        )
        lines.append(f"[{_clock_text(item.started_at)}] {who}: {item.text}")
    if not ctx.conversation:
        lines.append("(nothing yet)")
    audio = [m for m in ctx.media if m.kind == "audio"]
    images = [m for m in ctx.media if m.kind == "image"]
    if audio or images:
        lines.append(
            f"Recent media held by the session: {len(audio)} audio chunks, {len(images)} camera frames "
            f"(ids: {', '.join(m.ref_id for m in ctx.media)})."
        )
    lines += ["", f"Task: {ctx.task.input}"]
    return "\n".join(lines)
