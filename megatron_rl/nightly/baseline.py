"""Regressions against a stored report: the same entry's numbers, one tolerance per metric.

Compared numbers are the observed value of every assertion whose operator says which way is better
(`<`: lower is better, `>`: higher) plus a few tracked figures every GRPO run logs (TRACKED). A value is a
regression when it moved the bad way by more than the tolerance allows: max(|baseline| * rel, abs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError
from megatron_rl.nightly.assertions import evaluate, parse_assertion
from megatron_rl.nightly.results import EntryResult, Regression
from megatron_rl.nightly.suite import Suite

# expression -> which way is better; recorded whenever the run logged the metric.
TRACKED = {
    "median(timing/step_s)": "lower",
    "median(throughput/tokens_per_s)": "higher",
    "max(memory/peak_gb)": "lower",
    "median(train/token_mult_prob_error)": "lower",
    "mean(reward/mean[-10:])": "higher",
}


def tracked_values(result: EntryResult) -> dict[str, dict[str, Any]]:
    """expression -> {value, better, metric} for this entry: its assertions first, then TRACKED."""
    out: dict[str, dict[str, Any]] = {}
    for a, check in zip(result.entry.assertions, result.assertions):
        if a.better and a.metric != "step" and check.observed is not None and math.isfinite(check.observed):
            out[a.expression] = {"value": check.observed, "better": a.better, "metric": a.metric}
    for expression, better in TRACKED.items():
        if expression in out:
            continue
        a = parse_assertion(f"{expression} > 0", "tracked metric")
        check = evaluate(a, result.metrics.series)
        if check.observed is not None and math.isfinite(check.observed):
            out[expression] = {"value": check.observed, "better": better, "metric": a.metric}
    return out


def load_baseline(path: Path) -> dict[str, Any]:
    """A previous report's report.json (the report folder or the file itself)."""
    file = path / "report.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"--baseline {path}: no report.json there (give a nightly report folder).") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--baseline {path}: cannot read {file}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise UserError(f"--baseline {path}: {file} is not a nightly report.json (no `entries` list).")
    return data


def compare(suite: Suite, results: list[EntryResult], baseline: dict[str, Any]) -> list[Regression]:
    """Attaches each entry's regressions to it and returns them all. Entries or values the baseline lacks
    are not compared (a new entry has nothing to regress from)."""
    old = {e.get("name"): e.get("values") or {} for e in baseline["entries"] if isinstance(e, dict)}
    found = []
    for result in results:
        result.regressions = []
        before = old.get(result.entry.name, {})
        for expression, now in tracked_values(result).items():
            prev = before.get(expression)
            if not isinstance(prev, dict) or not isinstance(prev.get("value"), int | float):
                continue
            base = float(prev["value"])
            allowed = suite.tolerance_for(expression, now["metric"]).allowed(base)
            delta = now["value"] - base if now["better"] == "lower" else base - now["value"]
            if delta > allowed:
                reg = Regression(result.entry.name, expression, now["better"], base, now["value"], allowed)
                result.regressions.append(reg)
                found.append(reg)
    return found
