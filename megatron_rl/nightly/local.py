"""One suite entry run on this machine: a subprocess in its own session, its log in the run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.nightly.suite import Entry


@dataclass
class Outcome:
    """How a run ended, before its metrics are judged."""

    state: str  # completed | failed | timeout
    detail: str  # "exit code 1", "Slurm state FAILED", "timed out after 600 s of running"
    returncode: int | None = None


def local_command(entry: Entry, run_dir: Path) -> list[str]:
    if entry.command is not None:
        subs = {"{run_dir}": str(run_dir), "{steps}": str(entry.steps or ""), "{python}": sys.executable}
        out = []
        for part in entry.command:
            for key, value in subs.items():
                part = part.replace(key, value)
            out.append(part)
        return out
    return [
        sys.executable,
        "-m",
        "megatron_rl.launch",
        entry.algo,
        f"conf={entry.recipe}",
        *entry.launcher_overrides(run_dir),
        "cluster.launcher=local",
    ]


def _session_members(sid: int) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                pids.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return pids


def kill_session(sid: int, grace_s: float = 10.0) -> None:
    """Ends every process of the session the run was started in. Ray puts its workers in process groups of
    their own, so killing the run's process group alone would leave them; they do stay in its session."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in _session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _session_members(sid):
            time.sleep(0.2)
        if not _session_members(sid):
            return


class LocalRun:
    def __init__(self, entry: Entry, run_dir: Path, env: dict[str, str]) -> None:
        self.entry, self.run_dir, self.env = entry, run_dir, env
        self.log_path = run_dir / "launch.log"
        self.proc: subprocess.Popen | None = None
        self.started: float | None = None
        self.job_id: str | None = None

    def describe(self) -> str:
        import shlex

        return shlex.join(local_command(self.entry, self.run_dir))

    def start(self) -> Outcome | None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        command = local_command(self.entry, self.run_dir)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            log.write(f"$ {self.describe()}\n".encode())
            log.flush()
            try:
                # A session of its own: a timeout ends the whole tree (Ray, vLLM, Megatron ranks) and nothing
                # else; the child keeps its own copy of the log descriptor.
                self.proc = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, cwd=os.getcwd(), start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                return Outcome("failed", f"could not start {command[0]!r}: {exc}")
        self.started = time.monotonic()
        self.job_id = f"pid {self.proc.pid}"
        return None

    def running_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def poll(self) -> Outcome | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:
            if self.running_s() > self.entry.timeout_s:
                self.cancel()
                return Outcome("timeout", f"timed out after {self.entry.timeout_s:g} s; process tree killed")
            return None
        # The main process is done; helpers it left behind (a Ray head, say) must not outlive the entry.
        kill_session(self.proc.pid, grace_s=5.0)
        if rc == 0:
            return Outcome("completed", "exit code 0", 0)
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        return Outcome("failed", how, rc)

    def cancel(self) -> None:
        if self.proc is None:
            return
        kill_session(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
