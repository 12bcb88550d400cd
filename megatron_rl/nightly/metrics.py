"""Reading what a run leaves behind: metrics.jsonl as per-metric series (values in step order), its log tail."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunMetrics:
    series: dict[str, list[float]] = field(default_factory=dict)
    steps: dict[str, list[int]] = field(default_factory=dict)  # the step of each value in `series`
    rows: int = 0
    problems: list[str] = field(default_factory=list)  # unreadable lines, non-numeric values

    @property
    def last_step(self) -> int | None:
        s = self.series.get("step")
        return int(s[-1]) if s else None


def load_metrics(path: Path) -> RunMetrics:
    """Parses one JSON object per line. A run killed mid-write can leave a torn last line: it and any other
    unreadable line is skipped and recorded in `problems` (shown in the report), never silently."""
    out = RunMetrics()
    if not path.is_file():
        out.problems.append(f"{path} does not exist")
        return out
    by_step: dict[int, dict[str, float]] = {}
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            out.problems.append(f"{path.name} line {lineno}: not a JSON object with a 'step' ({line[:60]!r})")
            continue
        out.rows += 1
        # A step logged twice (a requeued Slurm job that resumed) keeps its latest values.
        merged = by_step.setdefault(step, {})
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                if value is not None:
                    out.problems.append(f"{path.name} line {lineno}: {key} is not a number ({value!r})")
                continue
            merged[key] = float(value)
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            out.series.setdefault(key, []).append(value)
            out.steps.setdefault(key, []).append(step)
    return out


def last_logged_step(path: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 if none): cheap progress for a run in flight."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def log_tail(path: Path | None, lines: int = 60) -> str:
    """The last `lines` lines of a log, colour codes stripped (Ray and rich colour their output)."""
    if path is None or not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - 256 * 1024))
        text = f.read().decode(errors="replace")
    # Progress bars redraw with '\r': keep each line's last state only.
    rows = [_ANSI.sub("", row).rsplit("\r", 1)[-1] for row in text.splitlines()]
    return "\n".join(rows[-lines:])
