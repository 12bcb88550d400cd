"""A real GRPO run (tiny recipe, Ray, 2 Megatron ranks, a vLLM engine) holds its run directory while it runs,
and nothing it started survives a kill -9 of its controller. The run's processes are found through a marker in
their environment that this test sets (every descendant inherits it), not through anything the run says."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

CLI = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny"]
MARK = "MEGATRON_RL_TEST_MARK"


def _marked(mark: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process whose environment carries `mark`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status", "cmdline"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get(MARK) == mark:
                found.append((proc.pid, " ".join(proc.info["cmdline"] or [])[:150]))
        except (psutil.Error, OSError):
            continue
    return found


def test_a_run_locks_its_directory_and_leaves_no_process_when_killed(tmp_path):
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        MARK: mark,
        "RAY_AUTH_MODE": "disabled",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", "run.steps=200", "run.checkpoint_every=1", "model.warmup_sft_steps=0"]
    with (tmp_path / "console.log").open("w") as console:
        run = subprocess.Popen([*CLI, *overrides, "--in-process"], env=env, stdout=console, stderr=console)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "step_000001").is_dir():  # every rank's checkpoint writer ran
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "console.log").read_text()
            time.sleep(0.5)
        members = _marked(mark)
        assert sum("PolicyWorker" in cmd for _, cmd in members) == 2 and any(
            "raylet" in c for _, c in members
        )
        # Megatron's checkpoint writer starts no process of its own (a Manager and its resource tracker).
        assert not [c for _, c in members if "resource_tracker" in c or "spawn_main" in c], members

        # A second command on the same directory: refused before it starts anything, naming the owner.
        config = (run_dir / "config.yaml").stat().st_mtime_ns
        second = subprocess.run([*CLI, *overrides], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another run: pid {run.pid} on host {socket.gethostname()}" in second.stderr
        assert "NeMo-Run experiment" not in second.stdout
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps))  # one run's rows, not two interleaved

        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        killed = time.monotonic()
        while (left := _marked(mark)) and time.monotonic() - killed < 30:
            time.sleep(0.5)
        assert left == [], f"still running {time.monotonic() - killed:.0f} s after the kill: {left}"
    finally:
        run.kill()
        for pid, _ in _marked(mark):
            os.kill(pid, signal.SIGKILL)
    # The lock file stays, naming the dead owner; the next run takes it over (tests/unit/test_run_safety.py).
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == run.pid
