"""How the local backend picks a client-declared tool for a task and fills its arguments.

Contract: `match_tool(text, tools)` embeds the task text and each tool's name and
description with the knowledge search's sentence encoder (`knowledge.embed`, the
same shared model) and returns the best tool with its cosine similarity, or None
when the best is under `MATCH_THRESHOLD`. It blocks (CPU work, maybe the model's
first load): call it from a thread. A tool's vectors are cached by their text.

`fill_arguments(schema, text, tool_words)` guesses arguments from the task text
by the tool's JSON schema, property by property:

- the one required free-text string (no `enum`) gets the text after the first
  tool-ish word (a word of the tool's or the property's name) and the connector
  words right after it, cut before trailing connectors and punctuation, with the
  enum values the text named taken out ("where is my order A17?" -> "A17",
  "weather in Paris in fahrenheit" -> "Paris"); when no tool-ish word is
  followed by anything, the whole text (less those enum values and trailing
  punctuation). A task that named its tool gives the whole text as it is. Two or
  more required free-text strings cannot be told apart: all count as missing.
  Optional free-text strings are left out;
- an `enum` property gets the enum string the text names (case-insensitive,
  whole words, "_" and "-" read as spaces; the earliest named wins);
- `number` / `integer` properties take the numerals in the text (17, -3, 2.5;
  not number words, not digits inside a word like "A17"), in text order, one
  each in schema order; a non-whole number does not fill an integer;
- `boolean` properties take yes / no / true / false words, in text order;
- other types (arrays, objects) are never filled; defaults are left to the tool.

It returns the arguments and, instead of a call, a `problem` when a required
property stays empty or the filled arguments fail the schema (a `minimum`, a
`pattern`, an invalid schema): the backend then does not call the tool.
Nothing here calls tools.
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import numpy as np

from ..knowledge import embed
from ..tools import Tool

# Cosine similarity a client tool needs to be chosen over the built-in routing. Measured with the
# shared all-MiniLM-L6-v2 encoder, scoring a task against max(description, "name words: description")
# (the description alone scored best; the name alone was noisy: "recommend a good book" -> book_table
# 0.30), over 10 tools (lookup_order, get_weather, set_timer, send_email, turn_on_lights, book_table,
# play_music, search_web, convert_currency, get_stock_price) and 3 phrasings of a request for each:
#   matching pairs (30): min 0.26, 10th percentile 0.31, median 0.48 (lowest: "search the web for pizza
#     places in Naples" -> search_web; 2 of 30 had a wrong tool ahead of the right one)
#   non-matching (34 tasks for the built-ins or small talk, best of the 10 tools): max 0.24, 90th
#     percentile 0.24, median 0.17 ("what day is it today" -> get_weather 0.24)
# At 0.28: 27 of 30 requests reach their tool and none of the 34 others is taken from the built-ins.
MATCH_THRESHOLD = 0.28
MAX_CACHED_TEXTS = 4_096  # tool texts whose vectors are kept (declarations repeat across tasks)

_WORD = re.compile(r"[\w'-]+")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")  # "A17" and "v2" are names, not numbers
_BOOLEAN = re.compile(r"\b(yes|true|no|false)\b", re.IGNORECASE)
_NAME_PARTS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")  # snake_case, kebab-case and camelCase
# words between a tool-ish word and its argument: "look up the order number 4411", "weather in Paris"
_CONNECTORS = frozenset(
    "a an the for about of on in at to from with by me my our your us up called named number "
    "is are please some any that this".split()
)
_TRAILING = "?.!,;:"  # punctuation cut from the end of a phrase
_MIN_STEM = 4  # words this long match by prefix: "orders" is tool-ish for lookup_order
_cache_lock = threading.Lock()
_cache: dict[str, np.ndarray] = {}


@dataclass
class Filled:
    arguments: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why the tool must not be called with them, or None


def name_words(name: str) -> list[str]:
    """The lower-case words of an identifier: "getWeather_now" -> ["get", "weather", "now"]."""
    return [part.lower() for part in _NAME_PARTS.findall(name)]


def tool_texts(tool: Tool) -> list[str]:
    """The texts a tool is matched by: its description, and its name's words with the description."""
    words = " ".join(name_words(tool.name))
    description = tool.description.strip()
    return [description, f"{words}: {description}"] if description else [words]


def _vectors(texts: list[str]) -> np.ndarray:
    """One unit-norm row per text, from the cache or freshly embedded (and then cached)."""
    with _cache_lock:
        known = {t: _cache[t] for t in texts if t in _cache}
    todo = [t for t in dict.fromkeys(texts) if t not in known]
    if todo:
        fresh = embed(todo)  # outside the lock: encoding is the slow part
        with _cache_lock:
            for text, vector in zip(todo, fresh, strict=True):
                if len(_cache) >= MAX_CACHED_TEXTS:
                    _cache.pop(next(iter(_cache)))  # the oldest: dicts keep insertion order
                _cache[text] = vector
        known.update(zip(todo, fresh, strict=True))
    return np.stack([known[t] for t in texts])


def match_tool(text: str, tools: Sequence[Tool]) -> tuple[Tool, float] | None:
    """The tool best matching `text` by meaning and its similarity, or None under the threshold (blocking)."""
    if not tools or not text.strip():
        return None
    views = [tool_texts(tool) for tool in tools]
    flat = [t for texts in views for t in texts]
    query = embed([text])[0]
    scores = _vectors(flat) @ query
    best_tool, best_score, start = tools[0], -1.0, 0
    for tool, texts in zip(tools, views, strict=True):
        score = float(scores[start : start + len(texts)].max())
        start += len(texts)
        if score > best_score:
            best_tool, best_score = tool, score
    return (best_tool, best_score) if best_score >= MATCH_THRESHOLD else None


def _type(prop: dict[str, Any]) -> str | None:
    kind = prop.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the value is filled as its non-null type
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def _is_toolish(word: str, tool_words: set[str]) -> bool:
    if word in tool_words:
        return True
    return len(word) >= _MIN_STEM and any(
        len(t) >= _MIN_STEM and (word.startswith(t) or t.startswith(word)) for t in tool_words
    )


def phrase(text: str, tool_words: Iterable[str]) -> str:
    """The text after its first tool-ish word and the connectors that follow (trailing connectors and
    punctuation cut), else the whole text (trailing punctuation cut)."""
    words = {w for w in tool_words if w not in _CONNECTORS}
    tokens = list(_WORD.finditer(text))
    lower = [t.group().lower() for t in tokens]
    first = next((i for i, w in enumerate(lower) if _is_toolish(w, words)), None)
    if first is not None:
        start, end = first + 1, len(tokens)
        while start < end and (lower[start] in _CONNECTORS or _is_toolish(lower[start], words)):
            start += 1
        while end > start and lower[end - 1] in _CONNECTORS:
            end -= 1
        if start < end:
            return text[tokens[start].start() : tokens[end - 1].end()]
    return text.rstrip(_TRAILING + string.whitespace).lstrip()


def _enum_value(values: list[Any], text: str) -> tuple[Any, tuple[int, int] | None]:
    """The enum string `text` names (earliest, then longest) and where, or (None, None)."""
    found: list[tuple[int, int, Any, tuple[int, int]]] = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            continue
        spaced = r"[\s_-]+".join(re.escape(w) for w in re.split(r"[\s_-]+", value.strip()))
        hit = re.search(rf"(?<!\w){spaced}(?!\w)", text, re.IGNORECASE)
        if hit:
            found.append((hit.start(), -len(value), value, hit.span()))
    if not found:
        return None, None
    best = min(found, key=lambda f: f[:2])
    return best[2], best[3]


def fill_arguments(schema: dict[str, Any], text: str, tool_words: Iterable[str] | None = None) -> Filled:
    """Arguments for `schema` guessed from `text`; see the module docstring for the rules.

    `tool_words` None: the text is the argument itself (a task that named its tool), so the free-text
    string gets all of it; else the words of the chosen tool's name, for `phrase`."""
    properties: dict[str, Any] = schema.get("properties") or {}
    required = [name for name in schema.get("required") or [] if isinstance(name, str)]
    numbers = iter(float(n) for n in _NUMBER.findall(text))
    booleans = iter(b.lower() in ("yes", "true") for b in _BOOLEAN.findall(text))
    free = [n for n in required if _type(properties.get(n) or {}) == "string" and "enum" not in properties[n]]
    arguments: dict[str, Any] = {}
    rest = text  # the text without the enum values it named: "weather in Paris in fahrenheit" -> "Paris"
    for prop in properties.values():
        if isinstance(prop, dict) and isinstance(prop.get("enum"), list):
            span = _enum_value(prop["enum"], text)[1]
            if span is not None:
                rest = rest[: span[0]] + " " * (span[1] - span[0]) + rest[span[1] :]
    for name, prop in properties.items():
        prop = prop if isinstance(prop, dict) else {}
        kind = _type(prop)
        if "enum" in prop:
            value = _enum_value(list(prop["enum"]), text)[0] if isinstance(prop["enum"], list) else None
        elif kind == "string":
            if free != [name]:
                value = None
            elif tool_words is None:
                value = text.strip()
            else:
                value = phrase(rest, [*tool_words, *name_words(name)])
        elif kind in ("number", "integer"):
            number = next(numbers, None)
            if kind == "integer":
                value = int(number) if number is not None and number.is_integer() else None
            else:
                value = int(number) if number is not None and number.is_integer() else number
        elif kind == "boolean":
            value = next(booleans, None)
        else:
            value = None
        if value is not None and value != "":
            arguments[name] = value
    missing = [name for name in required if name not in arguments]
    if missing:
        return Filled(arguments, f"the task does not give its required {', '.join(missing)}")
    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as exc:
        return Filled(arguments, f"the arguments read from the task do not fit: {exc.message}")
    except jsonschema.SchemaError as exc:
        return Filled(arguments, f"its parameters schema is invalid: {exc.message}")
    return Filled(arguments)
