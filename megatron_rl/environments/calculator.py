"""Safe arithmetic: evaluate an expression the model wrote by walking its syntax tree (never `eval`).

Accepted: int and float literals, + - * / // % **, unary + and -, parentheses. Anything else (names, calls,
attributes, strings, comparisons) is a CalculatorError naming what was refused. Sizes are bounded before
they are computed, so `9**9**9` or `10**10**6` is an error at once, not a hang or a huge number.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 500
MAX_RESULT_DIGITS = 1000  # an integer result (or operand) longer than this is refused
MAX_EXPONENT = 10_000
_MAX_BITS = int(MAX_RESULT_DIGITS * math.log2(10)) + 1

Number = int | float

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its result would be out of bounds."""


def evaluate(expression: str) -> Number:
    """The value of `expression`; CalculatorError for anything but bounded arithmetic."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expected an expression string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from None
    return _value(tree.body)


def format_number(value: Number) -> str:
    """Integers as integers; floats that are whole as integers too ("12" not "12.0"), else up to 12
    significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def _value(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    raise CalculatorError(f"not allowed in an arithmetic expression: {_describe(node)}")


def _check_power(base: Number, exponent: Number) -> None:
    """Refuse a power whose result would be too large before computing it."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {format_number(exponent)} is larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if (base.bit_length() - 1) * exponent > _MAX_BITS:
            raise CalculatorError(f"result would have more than {MAX_RESULT_DIGITS} digits")
    if isinstance(base, float | int) and base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    if base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise CalculatorError("fractional power of a negative number")


def _bounded(value: Number) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("complex result")
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        raise CalculatorError(f"result would have more than {MAX_RESULT_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Constant):
        return f"constant {node.value!r}"
    if isinstance(node, ast.Call):
        return "function call"
    return type(node).__name__
