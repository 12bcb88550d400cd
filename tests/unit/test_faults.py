"""Fault handling parts that need no workers: the watchdog's deadlines and escalation, reading a stack dump,
and the Slurm script's preemption lines run by a real bash against stand-in srun and scontrol."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.faults import stacks
from megatron_rl.faults.preemption import REQUEST_FILE, REQUEUE_EXIT, Preempted, Preemption
from megatron_rl.faults.watchdog import INTERRUPT_SIGNAL, Watchdog, collective_timeout_s
from megatron_rl.launch.slurm import preemption_lines, render


def test_deadline_is_factor_times_recent_max_with_a_floor():
    dog = Watchdog(SimpleNamespace(enabled=True, factor=3.0, floor_s=10.0), lambda *a: None)
    assert dog.deadline("train") == 30.0  # no history yet: factor x floor
    dog.history["train"].extend([2.0, 5.0])
    assert dog.deadline("train") == 15.0
    dog.history["refit"].append(1.0)
    assert dog.deadline("refit") == 10.0  # the floor
    assert collective_timeout_s(SimpleNamespace(factor=3.0, floor_s=10.0)) == 30.0


def test_a_phase_past_its_deadline_is_reported_once_and_the_next_one_is_not():
    fired, unstuck = [], threading.Event()

    def on_hang(phase, step, elapsed, deadline):  # as the controller does: the stuck wait ends
        fired.append((phase, step))
        unstuck.set()

    dog = Watchdog(SimpleNamespace(enabled=True, factor=1.0, floor_s=0.3), on_hang)
    started = time.monotonic()
    with dog.phase("train", 7):
        assert unstuck.wait(10)
    assert fired == [("train", 7)] and time.monotonic() - started < 3
    assert dog.take_fired().startswith("train of step 7 passed its 0 s deadline")
    with dog.phase("train", 8):
        time.sleep(0.05)
    assert fired == [("train", 7)]
    dog.close()


def test_a_phase_still_stuck_after_the_report_is_interrupted_even_with_sigint_ignored():
    dog = Watchdog(SimpleNamespace(enabled=True, factor=1.0, floor_s=0.3), lambda *a: None)
    started = time.monotonic()
    # As in a controller that a non-interactive shell started in the background (`nohup ... &`).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            with dog.phase("refit", 3):
                time.sleep(20)
    finally:
        signal.signal(signal.SIGINT, previous)
        dog.close()
    assert time.monotonic() - started < 5
    assert signal.getsignal(INTERRUPT_SIGNAL) in (signal.SIG_DFL, None)  # closing gave it back


def test_a_signal_stops_at_once_before_any_step_and_waits_for_the_step_end_after(tmp_path):
    # Not necessarily SIG_DFL: ray.init, run earlier in the same pytest process, installs its own.
    handler_before = signal.getsignal(signal.SIGTERM)
    (tmp_path / REQUEST_FILE).write_text("")  # left by the job before a requeue: not a new request
    with Preemption(tmp_path) as preemption:
        assert preemption.requested is None and not (tmp_path / REQUEST_FILE).exists()
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread
    with Preemption(tmp_path) as preemption:
        preemption.immediate = False  # steps are running
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert preemption.requested == "SIGUSR1"
    with Preemption(tmp_path) as preemption:
        preemption.immediate = False
        (tmp_path / REQUEST_FILE).write_text("")  # the Slurm batch shell's request
        assert preemption.requested == f"request file {tmp_path / REQUEST_FILE}"
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_stuck_in_names_the_innermost_frame_of_the_busiest_thread():
    dump = "\n".join(
        [
            "Thread 0x1 (most recent call first):",
            '  File "/usr/lib/python3.11/threading.py", line 327 in wait',
            "Current thread 0x2 (most recent call first):",
            '  File "/x/site-packages/torch/distributed/c10d.py", line 10 in all_reduce',
            '  File "/x/megatron_rl/policy/core.py", line 109 in _forward_step',
            '  File "/x/megatron_rl/grpo/policy_worker.py", line 132 in train',
        ]
    )
    assert stacks.stuck_in(dump) == "all_reduce <- _forward_step (core.py:109)"
    assert stacks.stuck_in("(pid 3 wrote no stacks within 5 s)") == "unknown"


def test_slurm_script_asks_for_the_signal_and_requeues():
    cfg = compose(
        "tiny",
        ["cluster.launcher=slurm", "cluster.account=a", "cluster.container_image=i", "cluster.gpus_per_node=8",
         "cluster.preempt_notice_s=120", "run.dir=/shared/run"],
    )  # fmt: skip
    script = render(cfg, "grpo")
    assert "#SBATCH --signal=B:USR1@120\n" in script and "#SBATCH --requeue\n" in script
    assert "\n".join(preemption_lines(Path("/shared/run"))) in script
    # The wrapper is defined before NeMo-Run's srun line that starts the step.
    assert script.index("srun() {") < script.index("srun --output")


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_preemption_lines_turn_usr1_into_a_request_and_exit_75_into_a_requeue(tmp_path):
    """bash runs the script's lines with a stand-in srun that, like the run, stops with 75 once asked."""
    run_dir, tools = tmp_path / "run", tmp_path / "bin"
    run_dir.mkdir()
    tools.mkdir()
    _tool(
        tools, "srun", f"while [ ! -e {run_dir / REQUEST_FILE} ]; do sleep 0.1; done; exit {REQUEUE_EXIT}\n"
    )
    _tool(tools, "scontrol", f'echo "$@" > {tmp_path / "scontrol.args"}\n')
    script = "\n".join(
        ["set +e", *preemption_lines(run_dir), "srun --output x bash node.sh", 'echo "srun returned $?"']
    )
    shell = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"},
    )  # fmt: skip
    time.sleep(1.0)  # srun is running
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=30)
    assert "SIGUSR1: asking the run to checkpoint and stop" in out
    assert "requeueing job 4242" in out and out.rstrip().endswith("srun returned 0")
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
