"""A rich progress bar for training loops: step N of M, a few live metrics, seconds per step, time left.

`fields` maps a label to a metric key, e.g. {"loss": "train/loss"}; metrics missing from an update keep
their previous value. `enabled=False` (ranks other than the logger) makes every call a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StepBar:
    def __init__(self, progress: Any, task: Any, fields: dict[str, str]) -> None:
        self.progress, self.task, self.fields = progress, task, fields

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            return
        values = {label: metrics[key] for label, key in self.fields.items() if key in metrics}
        self.progress.update(self.task, completed=step, **values)


@contextmanager
def step_progress(
    title: str,
    total: int,
    start: int = 0,
    fields: dict[str, str] | None = None,
    secs_key: str = "timing/step_s",
    enabled: bool = True,
) -> Iterator[StepBar]:
    fields = dict(fields or {})
    if not enabled:
        yield StepBar(None, None, fields)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    fields["secs"] = secs_key
    cols = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn()]
    cols += [TextColumn(f"{label} {{task.fields[{label}]:.4g}}") for label in fields if label != "secs"]
    cols += [TextColumn("{task.fields[secs]:.2f}s/step"), TimeRemainingColumn()]
    with Progress(*cols) as progress:
        task = progress.add_task(title, total=total, completed=start, **{k: float("nan") for k in fields})
        yield StepBar(progress, task, fields)
