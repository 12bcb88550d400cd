"""GRPO with two vLLM engines through the real CLI (`grpo conf=tiny generation.num_engines=2`): both engines
serve, the engine/policy mismatch stays at its one-engine level, and an engine process killed during the
run is restarted and refitted while the run goes on; with `generation.max_failures=0` the same kill stops
the run with an error naming the engine and its log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny", "--in-process"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
# Short runs: no warm start or evaluation (the mismatch and the engines' work do not need them).
COMMON = (
    "generation.num_engines=2",
    "model.warmup_sft_steps=0",
    "run.eval_every=0",
    "run.checkpoint_every=0",
)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def engine_pid(run_dir: Path, index: int, deadline: float) -> int:
    """From the header the engine writes into its log when it starts."""
    log = run_dir / "logs" / f"engine{index}.log"
    while time.monotonic() < deadline:
        if log.is_file() and (m := re.search(rf"worker log: engine{index} pid=(\d+)", log.read_text())):
            return int(m.group(1))
        time.sleep(0.5)
    raise AssertionError(f"no engine{index} start in {log}")


def run_and_kill_engine1(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Starts the run, kills engine 1's process once step 1 is logged, and waits for the run to end."""
    cmd = [*CLI, f"run.dir={run_dir}", *COMMON, *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        pid = engine_pid(run_dir, 1, deadline)
        while not rows(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_engines_serve_and_a_killed_engine_is_restarted(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_and_kill_engine1(run_dir, "run.steps=5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = rows(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]  # every step logged
    assert {p.name for p in (run_dir / "logs").iterdir()} >= {"engine0.log", "engine1.log"}
    restarted = [r["step"] for r in steps if r["generation/engine_restarts"] == 1]
    assert restarted and restarted[-1] == 5 and restarted[0] >= 2, [
        r["generation/engine_restarts"] for r in steps
    ]
    # Both engines serve every step, but the one whose generation lost engine 1 (its prompts went to engine 0).
    for r in steps:
        served = r["generation/engine0_samples"] > 0 and r["generation/engine1_samples"] > 0
        assert r["generation/engines"] == 2 or r["step"] == restarted[0], r
        assert served or r["step"] == restarted[0], r
        assert r["generation/engines_healthy"] == 2
        assert r["generation/engine0_samples"] + r["generation/engine1_samples"] == 16 * 8
        assert r["refit/engine0_s"] > 0 and r["refit/engine1_s"] > 0
    # fp32 engines and policy on the same weights, the restarted engine included (refitted before it
    # served; with its initial weights the ratio would be far above 1).
    assert all(r["train/token_mult_prob_error"] < 1.001 for r in steps), [
        r["train/token_mult_prob_error"] for r in steps
    ]
    # Two engine processes started for engine 1 (the log is appended to).
    assert (run_dir / "logs" / "engine1.log").read_text().count("worker log: engine1 pid=") == 2


def test_max_failures_zero_stops_the_run_naming_the_engine(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = run_and_kill_engine1(run_dir, "run.steps=30", "generation.max_failures=0")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = (run_dir / "logs" / "engine1.log").resolve()
    assert "error: generation engine 1 failed" in proc.stderr and "generation.max_failures=0" in proc.stderr
    assert f"its log: {log}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(rows(run_dir)) < 30 and time.monotonic() - started < 300
