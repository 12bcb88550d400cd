"""Preemption: SIGTERM or SIGUSR1 to the controller (Slurm's notice before the time limit, a cluster
scheduler's eviction, `kill`) asks the run to stop at the end of its current step with a checkpoint and exit
with REQUEUE_EXIT; running the same command again resumes from that checkpoint.

On Slurm the notice goes to the batch shell (`#SBATCH --signal=B:USR1@N`), which cannot reach a process inside
the job step's container: it creates the run directory's `preempt_request` file instead, which the controller
watches as it would a signal (megatron_rl.launch.slurm renders both halves).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

# sysexits' EX_TEMPFAIL ("try again later"): the Slurm script requeues the job on it, the local launcher
# reports it as a stop for preemption, not as a failure.
REQUEUE_EXIT = 75
REQUEST_FILE = "preempt_request"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """A preemption signal while no step has run since the last checkpoint (the set-up, a restart): there is
    nothing new to save, so the run stops at once (like KeyboardInterrupt, not an Exception)."""


class Preemption:
    """Installs the handlers in the main thread for the duration of a `with` block; `requested` names the
    signal (or the request file) once one arrived. While steps run (`immediate` false) the handler only
    records it: the driver decides where to stop (a step boundary), so no step is cut in half. Otherwise it
    raises Preempted."""

    def __init__(self, run_path: str | Path) -> None:
        self.request_file = Path(run_path) / REQUEST_FILE
        self.signal_name: str | None = None
        self.immediate = True
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> str | None:
        if self.signal_name is None and self.request_file.exists():
            self.signal_name = f"request file {self.request_file}"
        return self.signal_name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signal_name is None
        if first:
            self.signal_name = signal.Signals(signum).name
        if self.immediate:
            raise Preempted(self.signal_name)
        if first:
            print(
                f"{self.signal_name}: finishing this step, then a checkpoint and exit {REQUEUE_EXIT} (requeue)",
                flush=True,
            )

    def __enter__(self) -> Preemption:
        # A request left by an earlier job of this run (the one that was requeued) is done with.
        self.request_file.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            # Installed after Ray started: its own handlers would abort the process (status 134).
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        self.request_file.unlink(missing_ok=True)
