"""Launching a suite's entries, waiting on them with a progress display, judging each as it ends.

Local entries run one at a time (they share this machine); Slurm entries are all submitted up front and
polled together. A failed, timed-out or unsubmittable entry is recorded and the rest carry on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from megatron_rl.errors import UserError
from megatron_rl.nightly.local import LocalRun, Outcome
from megatron_rl.nightly.metrics import last_logged_step
from megatron_rl.nightly.results import EntryResult, judge
from megatron_rl.nightly.slurm import Scheduler, SlurmRun
from megatron_rl.nightly.suite import Entry, Suite
from megatron_rl.progress import entry_progress

STYLE = {"passed": "green", "failed": "red", "error": "red", "timeout": "red"}


@dataclass
class _Slot:
    entry: Entry
    run_dir: Path
    handle: Any = None  # LocalRun | SlurmRun
    launched: float = 0.0
    result: EntryResult | None = None


def _handle(entry: Entry, run_dir: Path, suite: Suite, launcher: str, scheduler: Scheduler) -> Any:
    if launcher == "local":
        return LocalRun(entry, run_dir, suite.env)
    return SlurmRun(entry, run_dir, scheduler)


def run_entries(
    suite: Suite,
    entries: list[Entry],
    launcher: str,
    run_root: Path,
    console: Console,
    poll_s: float = 2.0,
    scheduler: Scheduler | None = None,
) -> tuple[list[EntryResult], bool]:
    """Returns one result per entry, in suite order, and whether the user interrupted (Ctrl-C)."""
    scheduler = scheduler or Scheduler()
    slots = [_Slot(e, (run_root / e.name).absolute()) for e in entries]
    interrupted = False
    with entry_progress(console) as progress:
        for s in slots:
            progress.add(s.entry.name, s.entry.steps)

        def finish(s: _Slot, outcome: Outcome) -> None:
            duration = time.monotonic() - s.launched if s.launched else 0.0
            h = s.handle
            log = h.log_path if h is not None else s.run_dir / "launch.log"
            s.result = judge(s.entry, outcome, s.run_dir, duration, log, getattr(h, "job_id", None))
            status = s.result.status
            step = s.result.metrics.last_step or 0
            progress.finish(s.entry.name, f"[{STYLE[status]}]{status}[/]", step)
            failing = "; ".join(f"{a.text}: {a.message}" for a in s.result.failed_assertions[:3])
            progress.console.print(
                f"[{STYLE[status]}]{status.upper()}[/] {s.entry.name} ({outcome.detail}, "
                f"{duration:.0f} s){' - ' + failing if failing and status == 'failed' else ''}"
            )

        def launch(s: _Slot) -> None:
            s.launched = time.monotonic()
            progress.start(s.entry.name)
            try:
                s.handle = _handle(s.entry, s.run_dir, suite, launcher, scheduler)
                early = s.handle.start()
            except UserError as exc:  # the launcher refused this entry's config or layout
                s.run_dir.mkdir(parents=True, exist_ok=True)
                (s.run_dir / "launch.log").write_text(f"{exc}\n")
                s.handle = None
                early = Outcome("failed", f"not launched: {exc}")
            if early is not None:
                finish(s, early)
                return
            progress.update(s.entry.name, "submitted" if launcher == "slurm" else "running")
            progress.console.print(f"started {s.entry.name}: {s.handle.describe()}")

        try:
            limit = 1 if launcher == "local" else len(slots)
            while True:
                active = [s for s in slots if s.handle is not None and s.result is None]
                waiting = [s for s in slots if s.launched == 0.0]
                for s in waiting[: max(0, limit - len(active))]:
                    launch(s)
                active = [s for s in slots if s.handle is not None and s.result is None]
                if not active and not any(s.launched == 0.0 for s in slots):
                    break
                for s in active:
                    outcome = s.handle.poll()
                    if outcome is not None:
                        finish(s, outcome)
                        continue
                    step = last_logged_step(s.run_dir / "metrics.jsonl")
                    state = getattr(s.handle, "state", "running")
                    progress.update(s.entry.name, state.lower(), step)
                if any(s.handle is not None and s.result is None for s in slots):
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            interrupted = True
            for s in slots:
                if s.handle is not None and s.result is None:
                    s.handle.cancel()
                    finish(s, Outcome("failed", "interrupted (Ctrl-C); run cancelled"))
    return [s.result for s in slots if s.result is not None], interrupted
