"""A safe arithmetic evaluator for the background `calculator` tool.

Contract: `evaluate(expression)` parses the text with `ast` and walks a whitelist
of node types: numeric literals (int, float), the binary operators + - * / // % **,
unary + and -, and parentheses (which `ast` folds into the tree). Anything else -
names, calls, attributes, subscripts, strings, comprehensions, lambdas - is refused
with a `CalculatorError` naming the construct. No `eval`/`exec` is ever used.

Cost is bounded before it is paid: the input length, the tree size, every integer
result's size and every exponentiation's predicted size are capped, so inputs
like `9**9**9` or `2**10**10` are refused in microseconds instead of hanging the
event loop. It does not know about tools, tasks or natural language: turning
"17 times 23" into "17*23" is the caller's job.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 256  # longer inputs are refused before parsing
MAX_NODES = 128  # AST nodes; bounds the walk and nesting depth
MAX_RESULT_DIGITS = 300  # any intermediate or final integer above 10**300 is refused
MAX_EXPONENT = 10_000  # absolute exponent cap, checked before the power is computed

Number = int | float


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its result would be too large."""


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ALLOWED = "only numbers, + - * / // % ** and parentheses"
_REFUSED_NAMES: dict[type[ast.AST], str] = {
    ast.Name: "names",
    ast.Call: "function calls",
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambdas",
}


def evaluate(expression: str) -> Number:
    """Evaluate plain arithmetic; raise `CalculatorError` with a readable reason otherwise."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    return _eval(tree.body)


def format_number(value: Number) -> str:
    """Readable text for a result: integers exact, floats to 12 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        # bool is an int subclass; True + 1 is not arithmetic a user meant
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {type(node.value).__name__} literals")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is too large") from None
    kind = next((label for cls, label in _REFUSED_NAMES.items() if isinstance(node, cls)), None)
    if kind is not None:
        raise CalculatorError(f"not allowed: {kind} ({_ALLOWED})")
    raise CalculatorError(f"not allowed: '{type(node).__name__}' ({_ALLOWED})")


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {format_number(exponent)} is larger than {MAX_EXPONENT}")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > MAX_RESULT_DIGITS:
        raise CalculatorError(f"result would have more than {MAX_RESULT_DIGITS} digits")
    if base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise CalculatorError("fractional power of a negative number is not a real number")


def _check(value: Number) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not finite")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_DIGITS * math.log2(10):
        raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
    return value
