"""Faults on purpose, for tests: `MEGATRON_RL_FAULT=phase:rank:call:action[;...]` makes policy rank `rank`
die (`kill`: SIGKILL to itself) or sleep forever (`hang`) at its `call`-th `phase` call (train, logprobs),
counted over the whole run, restarts included, in `MEGATRON_RL_FAULT_DIR` (default: the run's logs folder)
so that each fault happens once. Unset, `fault_point` costs one dict lookup."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "MEGATRON_RL_FAULT"
DIR_ENV = "MEGATRON_RL_FAULT_DIR"


def fault_point(phase: str, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    from megatron_rl import console

    folder = Path(os.environ.get(DIR_ENV) or console.log_dir() or ".")
    counter = folder / f"fault_calls.{phase}.rank{rank}"
    with counter.open("a") as f:  # one byte per call: the file's size counts them across restarts
        f.write(".")
    calls = counter.stat().st_size
    for item in spec.split(";"):
        at_phase, at_rank, at_call, action = item.split(":")
        if (at_phase, int(at_rank), int(at_call)) != (phase, rank, calls):
            continue
        print(f"fault injected ({ENV}): {action} at {phase} call {calls} of rank {rank}", flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            while True:
                time.sleep(3600)
