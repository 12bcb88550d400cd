"""One suite entry run on this machine: a NeMo-Run experiment on the launcher's LocalExecutor (the executor
factory the CLI uses), its output copied into <run>/launch.log as it comes."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.launch.executors import build_executor, cli_command
from megatron_rl.launch.experiment import TaskExperiment
from megatron_rl.nightly.suite import Entry


@dataclass
class Outcome:
    """How a run ended, before its metrics are judged."""

    state: str  # completed | failed | timeout
    detail: str  # "exit code 1", "Slurm state FAILED", "timed out after 600 s of running"
    returncode: int | None = None


def local_command(entry: Entry, run_dir: Path) -> list[str]:
    """A custom `command` with {run_dir}, {steps} and {python} filled in, or the CLI run in its task's process
    (what `python -m megatron_rl.launch ...` itself launches)."""
    if entry.command is not None:
        subs = {"{run_dir}": str(run_dir), "{steps}": str(entry.steps or ""), "{python}": sys.executable}
        out = []
        for part in entry.command:
            for key, value in subs.items():
                part = part.replace(key, value)
            out.append(part)
        return out
    overrides = [*entry.launcher_overrides(run_dir), "cluster.launcher=local"]
    return cli_command(entry.algo, entry.recipe, overrides)


class LocalRun:
    def __init__(self, entry: Entry, run_dir: Path, env: dict[str, str]) -> None:
        self.entry, self.run_dir, self.env = entry, run_dir, env
        self.log_path = run_dir / "launch.log"
        self.task: TaskExperiment | None = None
        self.started: float | None = None
        self.job_id: str | None = None
        self._copied = 0

    def describe(self) -> str:
        where = f"NeMo-Run experiment {self.job_id}: " if self.job_id else ""
        return where + shlex.join(local_command(self.entry, self.run_dir))

    def start(self) -> Outcome | None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        command = local_command(self.entry, self.run_dir)
        self.log_path.write_text(f"$ {shlex.join(command)}\n")
        executor = build_executor("local", env={"PYTHONUNBUFFERED": "1", **self.env})
        self.task = TaskExperiment(f"nightly-{self.entry.name}", command, executor)
        try:
            self.task.start()
        except OSError as exc:
            return Outcome("failed", f"could not start {command[0]!r}: {exc}")
        self.started = time.monotonic()
        self.job_id = self.task.id
        return None

    def running_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def _copy_log(self) -> None:
        """Appends what the task printed since the last call (NeMo-Run's task log) to launch.log."""
        assert self.task is not None
        try:
            with self.task.log_path.open("rb") as src:
                src.seek(self._copied)
                data = src.read()
        except OSError:
            return
        with self.log_path.open("ab") as dst:
            dst.write(data)
        self._copied += len(data)

    def poll(self) -> Outcome | None:
        assert self.task is not None
        rc = self.task.poll()
        self._copy_log()
        if rc is None:
            if self.running_s() > self.entry.timeout_s:
                self.cancel()
                return Outcome("timeout", f"timed out after {self.entry.timeout_s:g} s; process tree killed")
            return None
        self.task.finish()
        if rc == 0:
            return Outcome("completed", "exit code 0", 0)
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        return Outcome("failed", how, rc)

    def cancel(self) -> None:
        if self.task is None:
            return
        self.task.cancel()
        self._copy_log()
        self.task.finish()
