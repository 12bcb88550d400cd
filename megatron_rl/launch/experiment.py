"""One command run as a NeMo-Run experiment on this machine (LocalExecutor): `nemo experiment list TITLE`,
`nemo experiment status ID` and `nemo experiment logs ID` show it like any NeMo-Run experiment.

NeMo-Run's local scheduler (torchx's) keeps the task's process handle in the process that launched it, so a
local task is cancelled from that process: `TaskExperiment.cancel` (Ctrl-C in the CLI, the nightly runner's
timeouts). The task runs in a session of its own; cancelling ends the whole session, Ray workers included,
which sit in process groups of their own and would survive NeMo-Run's process-group kill.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from megatron_rl.launch.executors import nemo_run

TASK = "train"  # the task's name inside its experiment (NeMo-Run's job id)
_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"}


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
    """Ends every process of session `sid`: SIGTERM, then SIGKILL after `grace_s`."""
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


class TaskExperiment:
    """start() launches `command` as the one task of a new experiment and returns at once; poll() gives the
    exit code once it has ended; cancel() ends it; finish() closes the experiment (NeMo-Run marks it done)."""

    def __init__(self, title: str, command: list[str], executor: Any) -> None:
        self.title, self.command, self.executor = title, list(command), executor
        self.exp: Any = None
        self.returncode: int | None = None
        self._finished = False

    @property
    def id(self) -> str:
        return self.exp._id

    @property
    def launched(self) -> bool:
        return self.exp is not None and bool(self.exp.jobs) and bool(self.exp.jobs[0].handle)

    @property
    def job(self) -> Any:
        return self.exp.jobs[0]

    def start(self) -> None:
        from rich.console import Console

        run = nemo_run()

        entry, *args = self.command
        if args[:1] == ["-m"] and len(args) > 1:  # `python -m module ...`: NeMo-Run's own module form
            script = run.Script(path=args[1], args=args[2:], entrypoint=entry, m=True)
        else:  # through env: NeMo-Run rewrites a bare `-c CODE` pair (its inline-script form)
            script = run.Script(path=entry, args=args, entrypoint="env")
        self.exp = run.Experiment(
            self.title,
            executor=self.executor,
            log_level="ERROR",
            enable_goodbye_message=False,
            skip_status_at_exit=True,
        )
        # Quiet here, but not saved as clean_mode: `nemo experiment status` must still print.
        self.exp.console = Console(quiet=True)
        self.exp.__enter__()
        try:
            self.exp.add(script, name=TASK)
            self.exp.run()
        except BaseException:
            self.exp.__exit__(None, None, None)
            raise

    @property
    def log_path(self) -> Path:
        """NeMo-Run's log of the task (stdout and stderr together), as `nemo experiment logs` prints it."""
        _, _, app_id = self.job.handle.rpartition("/")
        return Path(self.job.executor.job_dir) / "nemo_run" / app_id / TASK / "0" / "combined.log"

    def _process(self) -> Any:
        """The task's Popen. torchx's local scheduler is the only holder of it (NeMo-Run records no exit
        code): read it there, for the exit status and the session to clean up."""
        _, _, app_id = self.job.handle.rpartition("/")
        scheduler = self.exp._runner._scheduler(self.job.handle.partition(":")[0])
        return scheduler._apps[app_id].role_replicas[TASK][0].proc

    def poll(self) -> int | None:
        """None while the task runs; then its exit code (negative: the signal that ended it)."""
        if self.returncode is not None:
            return self.returncode
        proc = self._process()
        rc = proc.poll()
        if rc is None:
            return None
        self.job.status(self.exp._runner)  # NeMo-Run records the final state (`nemo experiment status`)
        kill_session(proc.pid, grace_s=5.0)  # helpers it left behind (a Ray head) must not outlive it
        self.returncode = rc
        return rc

    def send_signal(self, signum: int) -> bool:
        """Passes `signum` to the task's own process (the run's controller); False when it is not running."""
        if not self.launched or self.returncode is not None:
            return False
        try:
            os.kill(self._process().pid, signum)
        except ProcessLookupError:
            return False
        return True

    def cancel(self, grace_s: float = 10.0) -> None:
        """NeMo-Run's cancel (SIGTERM to the task's process group), then the rest of its session."""
        if not self.launched or self.returncode is not None:
            return
        proc = self._process()
        self.exp.cancel(self.job.id)
        kill_session(proc.pid, grace_s=grace_s)
        proc.wait()
        self.returncode = proc.returncode

    def finish(self) -> None:
        if self.exp is not None and not self._finished:
            self._finished = True
            self.exp.__exit__(None, None, None)
