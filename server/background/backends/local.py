"""The offline default backend: picks one tool for the task and streams its steps.

Contract: `LocalBackend(registry).run(ctx)` chooses a tool - the task's own `tool`
when given, else the calculator when the text holds arithmetic ("17 times 23",
"(2+3)*4"), the clock when it asks for the time, date or day, else a knowledge
search with the task text as query - calls it through the registry and streams
three partial results ("Thinking: ...", "Calling tool(args).", "Result: ...")
then the final answer. A tool failure (a refused expression, unknown zone)
raises `ToolError` and so fails the task with its message.

No model, no network, no downloads. It does not read the conversation beyond
the task text: it is a tool runner, not a reasoner.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from ..context import ContextPackage
from ..tools import ToolRegistry, output_text
from .base import TaskDelta, TaskEvent, TaskResult

MAX_ANSWER_CHARS = 400  # knowledge passages are cut to this in the spoken answer

# word forms of operators, applied in order (longest phrases first)
_WORD_OPERATORS: list[tuple[str, str]] = [
    (r"to the power of", "**"),
    (r"multiplied by", "*"),
    (r"divided by", "/"),
    (r"\bsquared\b", "**2"),
    (r"\bcubed\b", "**3"),
    (r"\btimes\b", "*"),
    (r"\bplus\b", "+"),
    (r"\bminus\b", "-"),
    (r"\bover\b", "/"),
    (r"\bmodulo\b", "%"),
    (r"\bmod\b", "%"),
    (r"(?<=\d)\s*x\s*(?=\d)", "*"),
    ("×", "*"),
    ("÷", "/"),
    (r"\^", "**"),
]
_ARITHMETIC = re.compile(r"[-+(\s]*[\d.]+(?:\s*(?:\*\*|//|[-+*/%()])\s*[-+(\s]*[\d.]*\)*)+")
_TIME_WORDS = re.compile(r"\b(time|date|day|today|clock|weekday|o'clock)\b", re.IGNORECASE)
_TIMEZONE = re.compile(r"\b([A-Z][A-Za-z_]+/[A-Za-z_]+(?:/[A-Za-z_]+)?|UTC)\b")


def find_expression(text: str) -> str | None:
    """The arithmetic inside natural text, as calculator syntax, or None when there is none."""
    normal = text.lower()
    for pattern, symbol in _WORD_OPERATORS:
        normal = re.sub(pattern, f" {symbol} ", normal)
    candidates = [m.group(0).strip() for m in _ARITHMETIC.finditer(normal)]
    with_operator = [c for c in candidates if re.search(r"\d\s*(\*\*|//|[-+*/%])\s*[-+(\s]*\d", c)]
    if not with_operator:
        return None
    expression = max(with_operator, key=len)
    return re.sub(r"\s+", "", expression).rstrip(".")


def _default_arguments(tool: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    """Arguments for a tool named without any: built-ins from the text, else the one required string."""
    if tool == "calculator":
        return {"expression": find_expression(text) or text}
    if tool == "clock":
        zone = _TIMEZONE.search(text)
        return {"timezone": zone.group(1)} if zone else {}
    required = schema.get("required", [])
    properties = schema.get("properties", {})
    if len(required) == 1 and properties.get(required[0], {}).get("type") == "string":
        return {required[0]: text}
    return {}


def _route(text: str) -> tuple[str, str]:
    """(tool, why) for a task without an explicit tool."""
    if find_expression(text) is not None:
        return "calculator", "the task looks like arithmetic"
    if _TIME_WORDS.search(text):
        return "clock", "the task asks for the time or date"
    return "knowledge_search", "searching the knowledge base"


def _call_text(tool: str, arguments: dict[str, Any]) -> str:
    args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"{tool}({args})"


def _answer(tool: str, arguments: dict[str, Any], output: Any) -> str:
    if tool == "calculator":
        return f"{arguments['expression']} = {output}"
    if tool == "clock":
        return f"It is {output}."
    if tool == "knowledge_search" and isinstance(output, list):
        if not output:
            return "Nothing in the knowledge base matches."
        best = output[0]
        return f"From {best['path']} ({best['title']}): {best['text'][:MAX_ANSWER_CHARS]}"
    return output_text(output)


class LocalBackend:
    """Tool runner over a `ToolRegistry`; the offline default backend."""

    name = "local"

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        task = ctx.task
        if task.tool is not None:
            tool, why = task.tool, f"the task asks for {task.tool}"
        else:
            tool, why = _route(task.input)
        yield TaskDelta(f"Thinking: {why}.\n")
        spec = self.registry.get(tool)
        arguments = (
            task.arguments
            if task.arguments is not None
            else _default_arguments(tool, spec.parameters, task.input)
        )
        yield TaskDelta(f"Calling {_call_text(tool, arguments)}.\n")
        output = await self.registry.call(tool, arguments)
        answer = _answer(tool, arguments, output)
        yield TaskDelta(f"Result: {answer}\n")
        data = {"tool": tool, "arguments": arguments, "output": output}
        if spec.brief is not None and (brief := spec.brief(output)) is not None:
            data["brief"] = brief
        yield TaskResult(text=answer, data=data)
