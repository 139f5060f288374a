"""The offline default backend: picks one tool for the task and streams its steps.

Contract: `LocalBackend(registry).run(ctx)` chooses a tool - the task's own `tool`
when given; else, when the session declared client tools (offered in the package
and callable in this task), the one whose name and description are closest in
meaning to the task text, if it reaches `MATCH_THRESHOLD` and its arguments can
be read from the text (`tool_choice`); else the calculator when the text holds
arithmetic ("17 times 23", "(2+3)*4"), the clock when it asks for the time, date
or day, else a knowledge search with the task text as query - calls it through
the registry and streams three partial results ("Thinking: ...", "Calling
tool(args).", "Result: ...") then the final answer. A client tool's call goes to
the client and waits for its output (the task's timeout bounds the wait); the
answer is that output, and the result data holds the match's `similarity`. A
tool failure (a refused expression, unknown zone) raises `ToolError` and so fails
the task with its message; a matcher that fails (no encoder) leaves the built-in
routing.

No language model, no network, no downloads: matching uses the knowledge
search's sentence encoder, in a thread. It does not read the conversation beyond
the task text: it is a tool runner, not a reasoner.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..context import ContextPackage
from ..tools import ToolRegistry, output_text
from .base import TaskDelta, TaskEvent, TaskResult
from .tool_choice import fill_arguments, match_tool, name_words

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 400  # knowledge passages are cut to this in the spoken answer
SIMILARITY_DIGITS = 3  # a matched client tool's similarity in the result data

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
# An arithmetic span is [-+( ]* NUMBER then one or more (OPERATOR [-+( ]* [digits.]* )*), spaces
# allowed before each operator. It is scanned by hand (`_arithmetic_spans`), not by a regex: the
# regex's nested quantifiers backtracked quadratically on inputs like "(" * 40000.
_OPERATOR = "-+*/%()"


# str.isspace / str.isdecimal are what the regex classes \s and \d test, so the scan and the regex agree
def _is_space(c: str) -> bool:
    return c.isspace()


def _is_lead(c: str) -> bool:  # may open a span, or an operand, before its number
    return c in "-+(" or c.isspace()


def _is_number(c: str) -> bool:
    return c == "." or c.isdecimal()


def _is_close(c: str) -> bool:
    return c == ")"


_WITH_OPERATOR = re.compile(r"\d\s*(?:\*\*|//|[-+*/%])[-+(\s]*\d")  # one class after the operator: linear
_TIME_WORDS = re.compile(r"\b(time|date|day|today|clock|weekday|o'clock)\b", re.IGNORECASE)
_TIMEZONE = re.compile(r"\b([A-Z][A-Za-z_]+/[A-Za-z_]+(?:/[A-Za-z_]+)?|UTC)\b")


def find_expression(text: str) -> str | None:
    """The arithmetic inside natural text, as calculator syntax, or None when there is none."""
    normal = text.lower()
    for pattern, symbol in _WORD_OPERATORS:
        normal = re.sub(pattern, f" {symbol} ", normal)
    candidates = [span.strip() for span in _arithmetic_spans(normal)]
    with_operator = [c for c in candidates if _WITH_OPERATOR.search(c)]
    if not with_operator:
        return None
    expression = max(with_operator, key=len)
    return re.sub(r"\s+", "", expression).rstrip(".")


def _run_end(text: str, start: int, accepts: Callable[[str], bool]) -> int:
    end = start
    while end < len(text) and accepts(text[end]):
        end += 1
    return end


def _arithmetic_spans(text: str) -> list[str]:
    """The arithmetic spans of `text`, left to right, in one linear pass.

    Each span is matched greedily with no backtracking (none is needed: no element of the
    grammar can match what the next one starts with), and a start that fails skips past the
    whole lead and number it scanned: every start inside them would fail the same way."""
    spans, start, n = [], 0, len(text)
    while start < n:
        number = _run_end(text, start, _is_lead)
        end = _run_end(text, number, _is_number)
        if end == number:  # no number after the lead
            start = number + 1
            continue
        stop = _operand_groups_end(text, end)
        if stop == end:  # a number with no operator after it
            start = end
            continue
        spans.append(text[start:stop])
        start = stop
    return spans


def _operand_groups_end(text: str, pos: int) -> int:
    """Where the operator groups after a number end: each is [ ]* OPERATOR [-+( ]* [digits.]* )*."""
    while True:
        op = _run_end(text, pos, _is_space)
        if op >= len(text) or text[op] not in _OPERATOR:
            return pos
        pos = _run_end(text, _run_end(text, _run_end(text, op + 1, _is_lead), _is_number), _is_close)


def _default_arguments(tool: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    """Arguments for a tool named without any: built-ins from the text, else read by its schema (the
    one required free-text string gets the whole text); what cannot be read is left for the schema
    check to refuse."""
    if tool == "calculator":
        return {"expression": find_expression(text) or text}
    if tool == "clock":
        zone = _TIMEZONE.search(text)
        return {"timezone": zone.group(1)} if zone else {}
    return fill_arguments(schema, text).arguments


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


@dataclass
class _Choice:
    tool: str
    why: str  # the "Thinking: ..." step
    arguments: dict[str, Any] | None = None  # None: read from the text once the tool is known
    similarity: float | None = None  # a matched client tool's cosine similarity to the task


class LocalBackend:
    """Tool runner over a `ToolRegistry`; the offline default backend."""

    name = "local"

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    async def run(self, ctx: ContextPackage) -> AsyncIterator[TaskEvent]:
        task = ctx.task
        if task.tool is not None:
            choice = _Choice(task.tool, f"the task asks for {task.tool}", task.arguments)
        else:
            choice = await self._choose(ctx)
        tool = choice.tool
        yield TaskDelta(f"Thinking: {choice.why}.\n")
        spec = self.registry.get(tool)
        arguments = choice.arguments
        if arguments is None:
            arguments = _default_arguments(tool, spec.parameters, task.input)
        yield TaskDelta(f"Calling {_call_text(tool, arguments)}.\n")
        output = await self.registry.call(tool, arguments)
        answer = _answer(tool, arguments, output)
        yield TaskDelta(f"Result: {answer}\n")
        data: dict[str, Any] = {"tool": tool, "arguments": arguments, "output": output}
        if spec.brief is not None and (brief := spec.brief(output)) is not None:
            data["brief"] = brief
        if choice.similarity is not None:
            data["similarity"] = round(choice.similarity, SIMILARITY_DIGITS)
        yield TaskResult(text=answer, data=data)

    async def _choose(self, ctx: ContextPackage) -> _Choice:
        """The tool for a task that named none: a matching client tool, else the built-in routing."""
        text = ctx.task.input
        on_client = self.registry.client_tools()
        offered = [on_client[spec.name] for spec in ctx.tools if spec.name in on_client]
        if offered:
            try:
                # embedding is CPU work (and may load the encoder): keep it off the event loop
                match = await asyncio.to_thread(match_tool, text, offered)
            except Exception:
                # an encoder that cannot load must not take the calculator and clock down with it
                log.warning("matching client tools failed; using the built-in tools", exc_info=True)
                match = None
            if match is not None:
                tool, score = match
                filled = fill_arguments(tool.parameters, text, name_words(tool.name))
                if filled.problem is None:
                    why = f"the task matches the client tool {tool.name}"
                    return _Choice(tool.name, why, filled.arguments, score)
                builtin, why = _route(text)
                return _Choice(builtin, f"{tool.name} matches but {filled.problem}; {why}")
        return _Choice(*_route(text))
