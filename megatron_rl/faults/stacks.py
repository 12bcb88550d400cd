"""Python stacks of the workers, for hang reports.

Every worker process registers faulthandler on DUMP_SIGNAL when it starts (console.redirect_to_log calls
`install`), so its stacks can be had even while it is stuck in a C call holding the GIL: the controller sends
the signal (directly on its own node, through a one-off Ray task on another) and reads what appeared at the
end of the worker's log file (<run>/logs/<name>.log, on the run directory every node sees).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DUMP_SIGNAL = signal.SIGUSR2
_HEADER = re.compile(r"^#### megatron-rl worker log: \S+ pid=(\d+) ")
_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+) in (\S+)')


def install() -> None:
    """In a worker: faulthandler writes every thread's stack to stderr (the worker's log) on DUMP_SIGNAL."""
    import faulthandler

    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


@dataclass
class Worker:
    """A worker the controller can ask for its stacks: its name (policy_rank1, engine0), log and node."""

    name: str
    log: Path | None
    node_id: str | None = None
    node: str = "?"  # host name, for people


def pid_from_log(log: Path) -> int | None:
    """The pid of the process that last started writing `log` (its header line)."""
    pid = None
    try:
        with log.open(errors="replace") as f:
            for line in f:
                if m := _HEADER.match(line):
                    pid = int(m.group(1))
    except OSError:
        return None
    return pid


def _send(pid: int, node_id: str | None) -> None:
    import ray

    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    if node_id is None or node_id == here:
        os.kill(pid, DUMP_SIGNAL)
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def kill_there(p: int, s: int) -> None:
        os.kill(p, s)

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    ray.get(kill_there.options(scheduling_strategy=strategy).remote(pid, int(DUMP_SIGNAL)), timeout=30)


def dump(worker: Worker, wait_s: float = 5.0) -> str:
    """The worker's stacks as faulthandler wrote them, or a line saying why there are none."""
    if worker.log is None or not worker.log.is_file():
        return "(no log file to read its stacks from: --verbose sends them to the console)"
    pid = pid_from_log(worker.log)
    if pid is None:
        return f"(no worker header in {worker.log})"
    start = worker.log.stat().st_size
    try:
        _send(pid, worker.node_id)
    except Exception as exc:  # noqa: BLE001 - a dead process or node: the report says so and goes on
        return f"(pid {pid}: could not be signalled: {type(exc).__name__}: {exc})"
    deadline, text, size = time.monotonic() + wait_s, "", start
    while time.monotonic() < deadline:
        time.sleep(0.25)
        new_size = worker.log.stat().st_size
        if new_size == size and "most recent call first" in text:
            break  # written and settled
        size = new_size
        with worker.log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    if "most recent call first" not in text:
        return f"(pid {pid} wrote no stacks within {wait_s:.0f} s)"
    return "\n".join(
        line for line in text.splitlines() if line.startswith(("Thread", "Current thread", "  File"))
    )


def stuck_in(stacks: str) -> str:
    """One line: where the busiest thread is (innermost frames first), e.g. `time.sleep <- train
    (policy_worker.py:104)`. The thread with most frames is the one doing the work (Ray's own threads idle
    in short stacks)."""
    threads: list[list[tuple[str, str, str]]] = []
    for line in stacks.splitlines():
        if line.startswith(("Thread", "Current thread")):
            threads.append([])
        elif (m := _FRAME.match(line)) and threads:
            threads[-1].append(m.groups())
    if not threads or not max(threads, key=len):
        return "unknown"
    frames = max(threads, key=len)
    ours = [f for f in frames if "megatron_rl" in f[0]]
    where = ours[0] if ours else frames[0]
    return f"{frames[0][2]} <- {where[2]} ({Path(where[0]).name}:{where[1]})"
