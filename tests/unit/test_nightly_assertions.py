"""The nightly assertion language: parsing, evaluation, and clear errors for malformed text."""

from __future__ import annotations

import math
import statistics

import pytest

from megatron_rl.errors import UserError
from megatron_rl.nightly.assertions import evaluate, parse_assertion

SERIES = {
    "step": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    "reward/mean": [0.1, 0.2, 0.4, 0.5, 0.7, 0.9],
    "train/token_mult_prob_error": [1.01, 1.02, 1.3, 1.01, 1.02, 1.03],
    "timing/step_s": [100.0, 90.0, 80.0, 85.0, 95.0, 1000.0],
}


@pytest.mark.parametrize(
    "text, agg, metric, window, is_index, op, threshold",
    [
        (
            "median(train/token_mult_prob_error) < 1.05",
            "median",
            "train/token_mult_prob_error",
            None,
            False,
            "<",
            1.05,
        ),
        ("mean(reward/mean[-10:]) > 0.6", "mean", "reward/mean", (-10, None, None), False, ">", 0.6),
        ("  max( timing/step_s )<=900 ", "max", "timing/step_s", None, False, "<=", 900.0),
        ("min(x[2:5]) >= -1e-3", "min", "x", (2, 5, None), False, ">=", -0.001),
        ("std(x[::2]) == 0", "std", "x", (None, None, 2), False, "==", 0.0),
        ("last(x[:-1]) < .5", "last", "x", (None, -1, None), False, "<", 0.5),
        ("first(eval/accuracy[-1]) > +2E2", "first", "eval/accuracy", (-1, None, None), True, ">", 200.0),
    ],
)
def test_parse_valid(text, agg, metric, window, is_index, op, threshold):
    a = parse_assertion(text)
    assert (a.agg, a.metric, a.window, a.is_index, a.op, a.threshold) == (
        agg,
        metric,
        window,
        is_index,
        op,
        threshold,
    )
    assert a.text == text.strip()


def test_expression_is_normalised_and_direction_follows_the_operator():
    a = parse_assertion("mean( reward/mean [ -10 : ] ) > 0.6")
    assert a.expression == "mean(reward/mean[-10:])"
    assert a.better == "higher"
    assert parse_assertion("max(m[1:4:2]) < 3").expression == "max(m[1:4:2])"
    assert parse_assertion("max(m[-1]) <= 3").better == "lower"
    assert parse_assertion("max(m) == 3").better is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("median train/loss < 1", "expected '('"),
        ("avg(train/loss) < 1", "unknown aggregation 'avg'"),
        ("median(train/loss < 1", "expected ')'"),
        ("median(train/loss) 1.05", "expected a comparison operator"),
        ("median(train/loss) => 1.05", "unknown operator '='"),
        ("median(train/loss) != 1.05", "unknown operator '!='"),
        ("median(train/loss) = 1.05", "unknown operator '='"),
        ("median(train/loss) < abc", "expected a number"),
        ("median(train/loss) < 1.05 and True", "unexpected text after the number"),
        ("median(train/loss[1.5:]) < 1", "slice bounds must be integers"),
        ("median(train/loss[1::0]) < 1", "slice step cannot be zero"),
        ("median(train/loss[]) < 1", "empty slice"),
        ("median(train/loss[1:2:3:4]) < 1", "at most two ':'"),
        ("__import__('os').system('x') < 1", "unexpected character"),
        ("median(train/loss) < 1; rm -rf /", "unexpected character ';'"),
        ("", "expected an aggregation name"),
    ],
)
def test_malformed_assertion_names_file_entry_and_text(text, reason):
    where = "suite file nightly/suites/x.yaml, entry 'llama8b'"
    with pytest.raises(UserError) as info:
        parse_assertion(text, where)
    msg = str(info.value)
    assert msg.startswith(where), msg
    assert repr(text) in msg and reason in msg, msg
    assert "column" in msg


def test_non_string_assertion_is_a_user_error():
    with pytest.raises(UserError, match="must be a string"):
        parse_assertion(1.05, "suite file s.yaml, entry 'e'")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, observed, passed",
    [
        (
            "median(train/token_mult_prob_error) < 1.05",
            statistics.median(SERIES["train/token_mult_prob_error"]),
            True,
        ),
        ("max(train/token_mult_prob_error) < 1.05", 1.3, False),
        ("mean(reward/mean[-2:]) > 0.6", 0.8, True),
        ("mean(reward/mean[:2]) > 0.6", 0.15000000000000002, False),
        ("min(timing/step_s) >= 80", 80.0, True),
        ("max(timing/step_s) < 900", 1000.0, False),
        ("max(timing/step_s[:-1]) < 900", 100.0, True),
        ("first(reward/mean) == 0.1", 0.1, True),
        ("last(reward/mean) <= 0.9", 0.9, True),
        ("last(reward/mean) < 0.9", 0.9, False),
        ("std(reward/mean) < 1", statistics.pstdev(SERIES["reward/mean"]), True),
        ("mean(reward/mean[::2]) > 0", (0.1 + 0.4 + 0.7) / 3, True),
        ("last(step) >= 6", 6.0, True),
        ("mean(reward/mean[-1]) > 0.85", 0.9, True),
    ],
)
def test_evaluate(text, observed, passed):
    r = evaluate(parse_assertion(text), SERIES)
    assert r.observed == pytest.approx(observed)
    assert r.passed is passed
    assert (r.message == "") is passed
    if not passed:
        assert f"{observed:.8g}" in r.message


def test_missing_metric_fails_with_suggestion():
    r = evaluate(parse_assertion("mean(reward[-10:]) > 0.6"), SERIES)
    assert not r.passed and r.observed is None
    assert "metric 'reward' is missing from the run" in r.message
    assert "did you mean 'reward/mean'" in r.message


def test_empty_window_and_nan_fail():
    r = evaluate(parse_assertion("mean(reward/mean[10:]) > 0"), SERIES)
    assert not r.passed and r.observed is None and "no values" in r.message
    r = evaluate(parse_assertion("mean(reward/mean[10]) > 0"), SERIES)
    assert not r.passed and "no values" in r.message
    nan = {"train/loss": [1.0, math.nan, 2.0]}
    r = evaluate(parse_assertion("max(train/loss) < 10"), nan)
    assert not r.passed and math.isnan(r.observed) and "NaN" in r.message
    assert evaluate(parse_assertion("max(train/loss[::2]) < 10"), nan).passed
