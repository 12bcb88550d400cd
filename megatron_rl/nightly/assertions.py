"""The metric assertion language of nightly suites, parsed by hand (nothing is ever passed to eval).

    AGG ( METRIC [ SLICE ] ) OP NUMBER

AGG: median, mean, max, min, last, first, std (population standard deviation). METRIC: a key of the run's
metrics.jsonl (`train/token_mult_prob_error`), its series being the values in step order over the rows that
have it. SLICE: Python style on that series: `[-10:]`, `[:5]`, `[2:8:2]`, or one index `[-1]`.
OP: < <= > >= ==. NUMBER: a decimal literal, optionally signed, with an optional exponent (`1e-3`).
Examples: `median(train/token_mult_prob_error) < 1.05`, `mean(reward/mean[-10:]) > 0.6`.
"""

from __future__ import annotations

import difflib
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from megatron_rl.errors import UserError

AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median,
    "mean": lambda v: math.fsum(v) / len(v),
    "max": max,
    "min": min,
    "last": lambda v: v[-1],
    "first": lambda v: v[0],
    "std": statistics.pstdev,
}
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
}
# Which way is better for a metric asserted with this operator; baseline comparison uses it.
DIRECTION = {"<": "lower", "<=": "lower", ">": "higher", ">=": "higher", "==": None}

_TOKEN = re.compile(
    r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_./-]*)"
    r"|(?P<op><=|>=|==|!=|<|>|=)"
    r"|(?P<punct>[()\[\]:]))"
)
_INT = re.compile(r"[-+]?\d+")


@dataclass(frozen=True)
class Assertion:
    text: str
    agg: str
    metric: str
    # (start, stop, step) of a slice, or (index, None, None) with is_index=True; None: the whole series
    window: tuple[int | None, int | None, int | None] | None
    is_index: bool
    op: str
    threshold: float

    @property
    def expression(self) -> str:
        """The left-hand side, normalised (`mean(reward/mean[-10:])`): the key baselines compare on."""
        return f"{self.agg}({self.metric}{_window_text(self.window, self.is_index)})"

    @property
    def better(self) -> str | None:
        return DIRECTION[self.op]

    def select(self, values: Sequence[float]) -> list[float]:
        if self.window is None:
            return list(values)
        start, stop, step = self.window
        if self.is_index:
            return [values[start]] if -len(values) <= start < len(values) else []  # type: ignore[operator]
        return list(values[start:stop:step])


@dataclass(frozen=True)
class AssertionResult:
    text: str
    expression: str
    passed: bool
    observed: float | None  # None when there was nothing to aggregate
    message: str  # why it failed; "" when it passed


def _window_text(window: tuple[int | None, int | None, int | None] | None, is_index: bool) -> str:
    if window is None:
        return ""
    if is_index:
        return f"[{window[0]}]"
    parts = ["" if v is None else str(v) for v in window]
    return "[" + (":".join(parts) if window[2] is not None else ":".join(parts[:2])) + "]"


def _tokenize(text: str, fail: Callable[[str, int], UserError]) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            col = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise fail(f"unexpected character {text[col]!r}", col)
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


def parse_assertion(text: str, where: str = "assertion") -> Assertion:
    """Parses one assertion; `where` names its place (suite file, entry) in the error message."""
    if not isinstance(text, str):
        raise UserError(
            f"{where}: an assertion must be a string like 'median(train/loss) < 2', got {text!r}."
        )

    def fail(reason: str, col: int) -> UserError:
        near = text[col : col + 12] or "end of text"
        return UserError(
            f"{where}: malformed assertion {text!r}: {reason} at column {col + 1} (near {near!r}). "
            f"Expected AGG(METRIC[SLICE]) OP NUMBER with AGG one of {', '.join(AGGREGATIONS)} and OP one of "
            f"{' '.join(OPERATORS)}, e.g. 'mean(reward/mean[-10:]) > 0.6'."
        )

    tokens = _tokenize(text, fail)
    pos = 0

    def peek() -> tuple[str, str, int]:
        return tokens[pos] if pos < len(tokens) else ("end", "", len(text.rstrip()))

    def take(kind: str, value: str | None = None, what: str = "") -> str:
        nonlocal pos
        k, v, col = peek()
        if k != kind or (value is not None and v != value):
            found = "the end of the assertion" if k == "end" else repr(v)
            raise fail(f"expected {what or repr(value)} but found {found}", col)
        pos += 1
        return v

    agg_col = peek()[2]
    agg = take("name", what="an aggregation name")
    if agg not in AGGREGATIONS:
        raise fail(f"unknown aggregation {agg!r} (known: {', '.join(AGGREGATIONS)})", agg_col)
    take("punct", "(")
    metric = take("name", what="a metric name")
    window, is_index = None, False
    if peek()[:2] == ("punct", "["):
        pos += 1
        window, is_index = _parse_window(peek, take, fail)
        take("punct", "]")
    take("punct", ")")
    op_col = peek()[2]
    op = take("op", what="a comparison operator")
    if op not in OPERATORS:
        raise fail(f"unknown operator {op!r} (use one of {' '.join(OPERATORS)})", op_col)
    threshold = float(take("num", what="a number"))
    if pos != len(tokens):
        raise fail("unexpected text after the number", tokens[pos][2])
    return Assertion(text.strip(), agg, metric, window, is_index, op, threshold)


def _parse_window(peek, take, fail) -> tuple[tuple[int | None, int | None, int | None], bool]:
    parts: list[int | None] = [None]
    colons = 0
    while True:
        kind, value, col = peek()
        if kind == "num":
            if not _INT.fullmatch(value) or parts[-1] is not None:
                raise fail(f"slice bounds must be integers, got {value!r}", col)
            parts[-1] = int(take("num"))
        elif (kind, value) == ("punct", ":"):
            take("punct", ":")
            colons += 1
            if colons > 2:
                raise fail("a slice has at most two ':'", col)
            parts.append(None)
        elif (kind, value) == ("punct", "]"):
            break
        else:
            raise fail("expected an integer, ':' or ']' in the slice", col)
    if colons == 0:
        if parts[0] is None:
            raise fail("empty slice '[]'", peek()[2])
        return (parts[0], None, None), True
    if len(parts) == 3 and parts[2] == 0:
        raise fail("slice step cannot be zero", peek()[2])
    while len(parts) < 3:
        parts.append(None)
    return (parts[0], parts[1], parts[2]), False


def evaluate(assertion: Assertion, series: Mapping[str, Sequence[float]]) -> AssertionResult:
    """Checks one assertion against a run's metric series (metric name -> values in step order)."""
    a = assertion

    def result(passed: bool, observed: float | None, message: str = "") -> AssertionResult:
        return AssertionResult(a.text, a.expression, passed, observed, message)

    if a.metric not in series:
        close = difflib.get_close_matches(a.metric, list(series), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        logged = ", ".join(sorted(series)[:12]) or "none"
        return result(False, None, f"metric {a.metric!r} is missing from the run (logged: {logged}){hint}")
    values = a.select(series[a.metric])
    if not values:
        return result(
            False,
            None,
            f"no values in {a.expression} (the run logged {len(series[a.metric])} for {a.metric})",
        )
    bad = sum(1 for v in values if not math.isfinite(v))
    if bad:
        return result(False, math.nan, f"{bad} of {len(values)} values of {a.metric} are NaN or infinite")
    observed = float(AGGREGATIONS[a.agg](values))
    if OPERATORS[a.op](observed, a.threshold):
        return result(True, observed)
    return result(False, observed, f"{a.expression} = {observed:.8g}, expected {a.op} {a.threshold:g}")
