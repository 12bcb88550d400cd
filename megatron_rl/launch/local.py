"""cluster.launcher=local: the run as a NeMo-Run experiment on this machine, followed from this console.

The task is this CLI with `--in-process`; its output goes to NeMo-Run's task log. This process shows the
step bar from the run's metrics.jsonl as rows appear, then the final figures and where the logs are. A
failed task: the end of its log and its exit status. Ctrl-C cancels the experiment. SIGTERM or SIGUSR1 (a
preemption notice) is passed on to the task, whose controller checkpoints and exits with
faults.preemption.REQUEUE_EXIT; this process then exits with that status too. With --verbose the task's whole
output is echoed here instead of the bar.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_rl.faults.preemption import REQUEUE_EXIT
from megatron_rl.faults.preemption import SIGNALS as PREEMPT_SIGNALS
from megatron_rl.launch.executors import build_executor, cli_command, task_overrides
from megatron_rl.launch.experiment import TaskExperiment

POLL_S = 0.5


def experiment_title(algo: str, cfg: Any) -> str:
    """`nemo experiment list TITLE` lists every run of this command and run name."""
    return f"{algo}-{cfg.run.name}"


def nemorun_home() -> str:
    from nemo_run.config import get_nemorun_home

    return get_nemorun_home()


def dry_run(cfg: Any, algo: str, overrides: list[str]) -> int:
    command = cli_command(algo, cfg.recipe, task_overrides(overrides, cfg.run.dir))
    sys.stdout.write(
        "#!/bin/bash\n"
        f"# cluster.launcher=local: NeMo-Run experiment {experiment_title(algo, cfg)!r} on its LocalExecutor;\n"
        "# its one task runs:\n" + shlex.join(command) + "\n"
    )
    sys.stdout.flush()
    print(f"[dry-run] {algo} conf={cfg.recipe}: nothing run", file=sys.stderr)
    return 0


class MetricsFollower:
    """New complete rows of metrics.jsonl since the last call. The run may rewrite the file when it starts
    (a fresh run deletes it, a resumed one trims rows past its checkpoint): then it is read again."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.inode = path, 0, None
        self.rows: list[dict] = []

    def new_rows(self) -> list[dict]:
        try:
            st = self.path.stat()
        except OSError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        self.rows += rows
        return rows


class LogEcho:
    """--verbose: the task's whole output on this console, as it comes, instead of the bar."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def flush(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _summary(rows: list[dict], fields: Sequence[tuple[str, str, str]]) -> str:
    parts = []
    for _, key, spec in fields:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if values:
            parts.append(f"{key} {values[0]:{spec}} -> {values[-1]:{spec}}" if len(values) > 1 else
                         f"{key} {values[-1]:{spec}}")  # fmt: skip
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        last = evals[-1]
        parts += [f"{k} {last[k]:.3f}" for k in sorted(last) if k.startswith("eval/accuracy")]
    return ", ".join(parts)


def _error_excerpt(text: str, max_lines: int = 60) -> str:
    """From the last traceback (or the last `error:` line) to the end: the error in full, not the run."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(("Traceback (most recent call last)", "error: ")):
            return "\n".join(lines[i:][-max_lines * 3 :])
    return "\n".join(lines[-max_lines:])


def run(cfg: Any, algo: str, overrides: list[str]) -> int:
    """Launches and follows the run; returns the exit status the CLI exits with."""
    from megatron_rl import console
    from megatron_rl.nightly.metrics import log_tail
    from megatron_rl.progress import BARS, step_progress

    run_dir = Path(cfg.run.dir).absolute()
    command = cli_command(algo, cfg.recipe, task_overrides(overrides, run_dir))
    task = TaskExperiment(experiment_title(algo, cfg), command, build_executor("local", cfg))
    title, fields = BARS[algo]  # the bar the run's driver shows in-process
    follower = MetricsFollower(run_dir / "metrics.jsonl")

    def pass_on(signum: int, frame: Any) -> None:
        if not task.send_signal(signum):  # not started yet (or already over): nothing to checkpoint
            raise KeyboardInterrupt
        print(f"{signal.Signals(signum).name}: passed on to the run (checkpoint, then stop)", flush=True)

    previous = {s: signal.signal(s, pass_on) for s in PREEMPT_SIGNALS}
    started = time.monotonic()
    rc: int | None = None
    echo = None
    try:
        task.start()
        print(
            f"{algo} conf={cfg.recipe}: NeMo-Run experiment {task.id} (local), run dir {run_dir}", flush=True
        )
        echo = LogEcho(task.log_path) if console.verbose() else None
        with step_progress(title, cfg.run.steps, 0, fields, enabled=echo is None) as bar:
            while rc is None:
                rc = task.poll()
                for row in follower.new_rows():
                    bar.update(int(row.get("step", 0)), row)
                if echo is not None:
                    echo.flush()
                if rc is None:
                    time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("interrupted: cancelling the experiment", file=sys.stderr, flush=True)
        task.cancel()
        rc = 130
    finally:
        task.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)
    wall = time.monotonic() - started
    if not task.launched:
        return rc or 130
    home = os.path.join(nemorun_home(), "experiments")
    if rc == 0:
        steps = max((int(r.get("step", 0)) for r in follower.rows), default=0)
        figures = _summary(follower.rows, fields)
        print(f"done: {steps}/{cfg.run.steps} steps in {wall:.0f} s" + (f"; {figures}" if figures else ""))
    elif rc == REQUEUE_EXIT:
        print(f"stopped for preemption with a checkpoint (exit status {rc}): run the same command to resume")
    elif rc != 130:
        rc = rc if rc > 0 else 1
        if echo is None:  # verbose: the whole log is on the console already
            print(_error_excerpt(log_tail(task.log_path, 400)), file=sys.stderr)
        print(f"error: the run failed (exit status {rc}); above, the end of its log", file=sys.stderr)
    print(f"task log: {task.log_path}\n  (`nemo experiment logs {task.id}`; experiments kept in {home})")
    print(f"run dir:  {run_dir} (config.yaml, metrics.jsonl, logs/, checkpoints/)")
    return rc
