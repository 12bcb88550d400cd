"""The one progress display: rich bars for training steps, converted bytes and suite entries.

`step_progress` is the bar every training command shows (GRPO, SFT, DPO), in-process or from a parent that
follows a run's metrics.jsonl: step M/N, a few live metrics, seconds per step (`timing/step_s`) and the time
left. `byte_progress` counts bytes for the checkpoint converter; `entry_progress` shows one row per entry of a
nightly suite with its state. They differ in what a unit is, so they are three small views over one library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

STEP_SECONDS = "timing/step_s"
# Each training command's bar: its title and (label, metric key, format spec) fields. The drivers show it
# in-process; the launcher shows the same bar from the run's metrics.jsonl.
BARS: dict[str, tuple[str, tuple[tuple[str, str, str], ...]]] = {
    "grpo": ("GRPO", (("reward", "reward/mean", ".3f"),)),
    "sft": ("SFT", (("loss", "train/loss", ".4g"), ("val", "val/loss", ".4g"))),
    "dpo": (
        "DPO",
        (
            ("loss", "train/loss", ".4g"),
            ("acc", "train/accuracy", ".4g"),
            ("margin", "train/rewards/margin", ".4g"),
        ),
    ),
}
_MISSING = "-"


def _format(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return format(value, spec)


class StepProgress:
    """One bar's live state; metrics absent from an update keep their previous value."""

    def __init__(self, progress: Progress | None, task: Any, fields: Sequence[tuple[str, str, str]]) -> None:
        self._progress, self._task, self._fields = progress, task, tuple(fields)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._progress is None:
            return
        shown = {
            f"f{i}": _format(metrics[key], spec)
            for i, (_, key, spec) in enumerate(self._fields)
            if key in metrics
        }
        if STEP_SECONDS in metrics:
            shown["secs"] = _format(metrics[STEP_SECONDS], ".2f")
        self._progress.update(self._task, completed=step, **shown)


@contextmanager
def step_progress(
    title: str,
    total: int,
    start: int = 0,
    fields: Sequence[tuple[str, str, str]] = (),
    console: Console | None = None,
    enabled: bool = True,
) -> Iterator[StepProgress]:
    """A step bar; `fields` are (label, metric key, format spec), e.g. ("reward", "reward/mean", ".3f").

    `enabled=False` (ranks other than the one that logs) makes every update a no-op.
    """
    if not enabled:
        yield StepProgress(None, None, fields)
        return
    columns = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{label} {{task.fields[f{i}]}}") for i, (label, _, _) in enumerate(fields)]
    columns += [TextColumn("{task.fields[secs]} s/step"), TimeRemainingColumn()]
    blanks = {f"f{i}": _MISSING for i in range(len(fields))} | {"secs": _MISSING}
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=total, completed=start, **blanks)
        yield StepProgress(progress, task, fields)


@contextmanager
def byte_progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(nbytes)`; on stderr, so JSON printed on stdout stays clean. A no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


class EntryProgress:
    """One row per suite entry: its steps so far out of its total, a state word, the time since it started."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}
        self.console = progress.console

    def add(self, name: str, total: int) -> None:
        self._tasks[name] = self._progress.add_task(name, total=total, state="waiting", start=False)

    def start(self, name: str) -> None:
        self._progress.start_task(self._tasks[name])

    def update(self, name: str, state: str, step: int | None = None) -> None:
        done = {} if step is None else {"completed": step}
        self._progress.update(self._tasks[name], state=state, **done)

    def finish(self, name: str, state: str, step: int) -> None:
        self.update(name, state, step)
        self._progress.stop_task(self._tasks[name])


@contextmanager
def entry_progress(console: Console | None = None) -> Iterator[EntryProgress]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        yield EntryProgress(progress)
