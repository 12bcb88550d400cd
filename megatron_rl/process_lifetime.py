"""No process of a run outlives it.

A run starts many processes it does not hold directly: a local Ray cluster (its GCS, raylet, agents and
workers), the workers' own children (a checkpoint writer, vLLM's engine processes), spawned SPMD ranks. When the
process that owns the run dies without cleaning up (kill -9, the OOM killer), some of them would run on under
PID 1. Two mechanisms prevent that:

- `run_processes()` marks the owner's environment with a run id (`MEGATRON_RL_RUN_ID`) before anything starts,
  so every descendant carries it, however many hops away (Ray's workers are children of its raylet, not of the
  owner). It also starts a small watcher process (`python -m megatron_rl.process_lifetime`, in a session of its
  own so a process-group kill of the run does not take it along) that waits for the owner to end and then stops
  every process that still carries the mark: SIGTERM, then SIGKILL.
- `die_with_parent()`: a child the run starts itself (a spawned rank) asks the kernel to kill it the moment its
  parent dies (Linux's PR_SET_PDEATHSIG; elsewhere the watcher alone does it).

Processes of a cluster started elsewhere (Slurm's Ray nodes, `RAY_ADDRESS`) do not carry the mark: the job's
end stops them there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

RUN_ENV = "MEGATRON_RL_RUN_ID"
_WATCHERS: list[subprocess.Popen] = []
ENDED = b"ended\n"  # owner -> watcher: an orderly end (a killed owner never sends it)
POLL_S = 0.2  # how often the watcher looks for its owner
TERM_GRACE_S = 3.0  # from SIGTERM to SIGKILL
REAP_DEADLINE_S = 30.0  # the watcher gives up after this (processes that cannot be signalled)


@contextmanager
def run_processes() -> Iterator[str]:
    """Marks every process this one starts inside the block as part of one run, and has them stopped when this
    process ends (after the block they would not carry the mark). Yields the run id."""
    run_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = run_id
    watcher = None
    try:
        watcher = start_watcher(run_id)
        _WATCHERS.append(watcher)  # it outlives the block, by design: held until this process ends
        yield run_id
    finally:
        if watcher is not None:
            _tell_ended(watcher)
        if previous is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = previous


def start_watcher(run_id: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}  # the watcher must not count itself
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_rl.process_lifetime", str(os.getpid()), run_id],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def _tell_ended(watcher: subprocess.Popen) -> None:
    """The run ended in order (its last line is on the console): what is left, the watcher stops quietly."""
    try:
        watcher.stdin.write(ENDED)
        watcher.stdin.flush()
    except (OSError, ValueError):
        pass


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """This process gets `sig` when its parent dies (Linux); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before the call: the kernel will not send it
        os.kill(os.getpid(), sig)


def members(run_id: str) -> list:
    """The live processes (psutil.Process) that carry `run_id`, this one excepted."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(RUN_ENV) == run_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def stop_members(run_id: str, deadline_s: float = REAP_DEADLINE_S) -> list[str]:
    """SIGTERM, then SIGKILL, to every process of the run, until none is left (a dying parent may still start
    one) or the deadline passes. Returns the names of the processes stopped."""
    import psutil

    stopped: list[str] = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        procs = members(run_id)
        if not procs:
            break
        for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
            for proc in procs:
                try:
                    if sig == signal.SIGTERM:
                        stopped.append(f"{proc.pid} {proc.name()}")
                    proc.send_signal(sig)
                except psutil.Error:
                    continue
            _, procs = psutil.wait_procs(procs, timeout=wait)
            if not procs:
                break
    return stopped


def _watch(owner: int, run_id: str) -> int:
    """The watcher: once `owner` (its parent) has ended, stops what is left of the run; says so unless the owner
    ended in order (then a leftover is only a helper still shutting down)."""
    import select

    told, listening = b"", True
    while listening and (os.getppid() == owner or select.select([0], [], [], 0)[0]):
        if select.select([0], [], [], POLL_S)[0]:
            data = os.read(0, 64)
            told += data
            listening = bool(data)  # end of file: nothing more will come (the owner is gone)
    while os.getppid() == owner:
        time.sleep(POLL_S)
    stopped = stop_members(run_id)
    if stopped and ENDED not in told:
        print(
            f"megatron-rl: the run's process {owner} ended; stopped {len(stopped)} "
            f"process{'es' if len(stopped) > 1 else ''} it left: "
            + ", ".join(stopped[:12]) + (" ..." if len(stopped) > 12 else ""),
            file=sys.stderr,
            flush=True,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run; the watcher ends after it
    sys.exit(_watch(int(sys.argv[1]), sys.argv[2]))
