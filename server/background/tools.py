"""One registry of tools for the background model, with the built-in tools.

Contract: a `Tool` is a name, a description, a JSON schema for its arguments, an
async callable taking those arguments as keywords, and a `background` flag (a call
to it from the live model runs as a background task). `ToolRegistry.call` parses
and validates arguments against the schema (jsonschema) before calling, and turns
every failure - unknown tool, bad arguments, the tool raising - into a
`ToolError` with a readable message, so a backend can hand it back to a model.
User tools are added with `register(Tool(...))` or the `@registry.tool(...)`
decorator. Built-ins (`default_registry`): `calculator`, `clock`,
`knowledge_search`.

Tools a client declared (session.update) run on the client: the pool sets
`session_tools` inside each task's own asyncio context to that session's client
tools, and `get`, `call` and `in` see them beside the registered ones (the
registered one wins a shared name), and `client_tools()` lists them, so a backend
reaches them without knowing sessions. A client's schema is not checked when it
is declared: a broken one fails that tool's calls with a `ToolError`. Tools run on the asyncio loop: a
tool doing blocking or CPU-heavy work must offload it (the knowledge search runs
in a thread). It does not know about tasks, sessions or backends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema

from .calculator import CalculatorError, evaluate, format_number
from .context import ToolSpec
from .knowledge import KnowledgeBase, default_knowledge

ToolFn = Callable[..., Awaitable[Any]]
MAX_SEARCH_HITS = 5  # upper bound of knowledge_search's `k`
CLOCK_FORMAT = "%A %Y-%m-%d %H:%M:%S"  # the clock's line, before its "(zone, UTC+hhmm)"


# the running task's client-declared tools (name -> Tool); set by the pool in each task's own context
session_tools: ContextVar[Mapping[str, Tool]] = ContextVar(
    "session_tools", default=MappingProxyType({})
)


class ToolError(Exception):
    """A tool could not run or failed; the message is fit to show a model or a user."""


@dataclass
class Tool:
    name: str  # unique name the model calls it by
    description: str  # what it does, shown to the model
    parameters: dict[str, Any]  # JSON schema (type "object") of the keyword arguments
    fn: ToolFn  # async callable(**arguments) -> JSON-serialisable result
    background: bool = False  # a call from the live model runs as a background task
    # the short form of an output that an interaction model speaks from text-in ("2:43" for the clock's
    # full line); None, or returning None: the output is that form already
    brief: Callable[[Any], str | None] | None = None

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=self.name,
            description=self.description,
            parameters=self.parameters,
            background=self.background,
        )


def openai_tool(spec: ToolSpec) -> dict[str, Any]:
    """The chat-completions `tools` entry for a tool spec."""
    return {
        "type": "function",
        "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters},
    }


def output_text(value: Any) -> str:
    """A tool result as text for a model: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class ToolRegistry:
    """Tools by name; the one place tools are declared and called."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, tool: Tool) -> Tool:
        jsonschema.Draft202012Validator.check_schema(tool.parameters)
        if tool.parameters.get("type") != "object":
            raise ValueError(f"tool {tool.name!r}: parameters schema must have type 'object'")
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def tool(
        self, name: str, description: str, parameters: dict[str, Any], background: bool = False
    ) -> Callable[[ToolFn], ToolFn]:
        """Decorator form of `register` for an async function."""

        def wrap(fn: ToolFn) -> ToolFn:
            self.register(Tool(name, description, parameters, fn, background))
            return fn

        return wrap

    def __contains__(self, name: object) -> bool:
        return name in self._tools or name in session_tools.get()

    def get(self, name: str) -> Tool:
        tool = self._tools.get(name) or session_tools.get().get(name)
        if tool is None:
            known = ", ".join(sorted({*self._tools, *session_tools.get()}))
            raise ToolError(f"unknown tool {name!r}; known: {known}")
        return tool

    def client_tools(self) -> Mapping[str, Tool]:
        """The running task's client-declared tools (name -> Tool); empty outside a pool task."""
        return session_tools.get()

    def specs(self) -> list[ToolSpec]:
        return [tool.spec() for tool in self._tools.values()]

    async def call(self, name: str, arguments: dict[str, Any] | str | None) -> Any:
        """Validate `arguments` (a dict or a JSON object string) and run the tool."""
        tool = self.get(name)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolError(f"{name}: arguments are not valid JSON: {exc.msg}") from None
        arguments = {} if arguments is None else arguments
        try:
            jsonschema.validate(arguments, tool.parameters)
        except jsonschema.ValidationError as exc:
            raise ToolError(f"{name}: invalid arguments: {exc.message}") from None
        except jsonschema.SchemaError as exc:
            # a client's declared schema is not checked at session.update; a broken one fails this call only
            raise ToolError(f"{name}: its parameters schema is invalid: {exc.message}") from None
        try:
            return await tool.fn(**arguments)
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(f"{name} failed: {exc}") from exc


async def _calculator(expression: str) -> str:
    try:
        return format_number(evaluate(expression))
    except CalculatorError as exc:
        raise ToolError(f"calculator refused {expression!r}: {exc}") from None


async def _clock(timezone: str = "UTC") -> str:
    try:
        now = datetime.now(ZoneInfo(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(
            f"clock: unknown time zone {timezone!r} (use an IANA name like 'Europe/Paris')"
        ) from None
    return now.strftime(f"{CLOCK_FORMAT} ({timezone}, UTC%z)")


def _clock_brief(output: Any) -> str | None:
    """12-hour "h:mm", no leading zero: how the demo model was trained to say a time."""
    try:
        now = datetime.strptime(str(output).split(" (")[0], CLOCK_FORMAT)
    except ValueError:
        return None
    return f"{now.hour % 12 or 12}:{now.minute:02d}"


def _knowledge_tool(knowledge: KnowledgeBase) -> ToolFn:
    async def knowledge_search(query: str, k: int = 3) -> list[dict[str, Any]]:
        # embedding the query is CPU work: keep it off the event loop
        hits = await asyncio.to_thread(knowledge.search, query, k)
        return [hit.as_dict() for hit in hits]

    return knowledge_search


CALCULATOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"expression": {"type": "string", "description": "arithmetic, e.g. '(17 + 3) * 23 / 2'"}},
    "required": ["expression"],
    "additionalProperties": False,
}
CLOCK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "description": "IANA time zone, default 'UTC'"}},
    "additionalProperties": False,
}
KNOWLEDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "what to look for, in plain words"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_HITS, "description": "number of hits"},
    },
    "required": ["query"],
    "additionalProperties": False,
}


def default_registry(knowledge: KnowledgeBase | None = None) -> ToolRegistry:
    """A registry with the built-in tools; `knowledge` defaults to the bundled markdown folder."""
    registry = ToolRegistry()
    registry.register(
        Tool(
            "calculator",
            "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
            CALCULATOR_SCHEMA,
            _calculator,
        )
    )
    registry.register(
        Tool("clock", "The current date, weekday and time in a time zone.", CLOCK_SCHEMA, _clock,
             brief=_clock_brief)
    )
    registry.register(
        Tool(
            "knowledge_search",
            "Search the local knowledge base (markdown documents) and return the best matching passages.",
            KNOWLEDGE_SCHEMA,
            _knowledge_tool(knowledge or default_knowledge()),
        )
    )
    return registry
