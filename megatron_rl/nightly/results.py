"""Judging one finished entry: its outcome plus its metrics against its assertions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.nightly.assertions import AssertionResult, evaluate
from megatron_rl.nightly.local import Outcome
from megatron_rl.nightly.metrics import RunMetrics, load_metrics, log_tail
from megatron_rl.nightly.suite import Entry

# passed: ran to the end and every assertion held. failed: ran to the end, an assertion did not hold.
# error: the run itself failed (exit code, Slurm state, submission). timeout: killed for running too long.
STATUSES = ("passed", "failed", "error", "timeout")


@dataclass
class Regression:
    entry: str
    expression: str
    better: str
    baseline: float
    current: float
    allowed: float  # the absolute change the tolerance allowed

    @property
    def change(self) -> str:
        if self.baseline == 0:
            return f"{self.current - self.baseline:+.4g}"
        return f"{100 * (self.current - self.baseline) / abs(self.baseline):+.1f}%"


@dataclass
class EntryResult:
    entry: Entry
    status: str
    detail: str
    duration_s: float
    run_dir: Path
    log_path: Path | None
    job_id: str | None
    assertions: list[AssertionResult]
    metrics: RunMetrics
    log_tail: str = ""
    regressions: list[Regression] = field(default_factory=list)

    @property
    def failed_assertions(self) -> list[AssertionResult]:
        return [a for a in self.assertions if not a.passed]

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def judge(
    entry: Entry,
    outcome: Outcome,
    run_dir: Path,
    duration_s: float,
    log_path: Path | None,
    job_id: str | None = None,
) -> EntryResult:
    """Assertions are evaluated even for runs that errored: the steps they did log help the diagnosis."""
    metrics = load_metrics(run_dir / "metrics.jsonl")
    checks = [evaluate(a, metrics.series) for a in entry.assertions]
    if outcome.state == "completed":
        status = "passed" if all(c.passed for c in checks) else "failed"
    else:
        status = "timeout" if outcome.state == "timeout" else "error"
    tail = log_tail(log_path) if status != "passed" else ""
    return EntryResult(
        entry=entry,
        status=status,
        detail=outcome.detail,
        duration_s=duration_s,
        run_dir=run_dir,
        log_path=log_path,
        job_id=job_id,
        assertions=checks,
        metrics=metrics,
        log_tail=tail,
    )
