"""Faults on the tiny GRPO recipe (docs/faults.md): a policy rank killed with SIGKILL and one that hangs are
restarted from the last checkpoint and the run ends as if uninterrupted; SIGTERM checkpoints and exits with
the requeue status, and the same command then resumes; a dead rank without restarts, and Ctrl-C, stop with a
clear line. Faults come from the test hook megatron_rl.faults.inject (MEGATRON_RL_FAULT)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.faults.preemption import REQUEUE_EXIT
from tests.functional.ctrl_c import popen_interruptible

CLI = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
RUN = ("run.steps=6", "run.checkpoint_every=2", "model.warmup_sft_steps=0")
# Short deadlines: the hang is found ~10 s into the stuck phase.
WATCH = ("run.watchdog.floor_s=10", "run.watchdog.factor=3")
VARYING = ("timing/", "throughput/", "time", "memory/", "refit/", "fault/")


def cli(run_dir: Path, *overrides: str, in_process: bool = True) -> list[str]:
    return [*CLI, f"run.dir={run_dir}", *RUN, *overrides, *(["--in-process"] if in_process else [])]


def env(fault: str = "") -> dict[str, str]:
    return {**ENV, "MEGATRON_RL_FAULT": fault} if fault else ENV


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.startswith(VARYING) and not k.endswith("_per_s")}
        for r in rows(run_dir)
    ]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = comparable(reference), comparable(run_dir)
    assert [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)


def max_weight_diff(run_dir: Path, reference: Path) -> float:
    from safetensors.torch import load_file

    a = load_file(str(reference / "hf_export" / "model.safetensors"))
    b = load_file(str(run_dir / "hf_export" / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(cli(run_dir), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_restarts_then_sigterm_then_the_same_command_ends_as_one_uninterrupted_run(reference, tmp_path):
    """One run through the launcher (a NeMo-Run experiment): rank 1 dies (SIGKILL) in step 4's train; after
    the restart (from step 2) rank 0 sleeps forever in step 3's train: the watchdog reports it and restarts
    again; then SIGTERM to the launcher reaches the controller, which checkpoints and exits 75, and so does
    the launcher. The same command, run again, finishes: metrics and weights are the uninterrupted run's."""
    run_dir = tmp_path / "run"
    command = cli(run_dir, "run.max_restarts=2", *WATCH, in_process=False)
    fault = env("train:1:4:kill;train:0:5:hang")
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fault)
    restarts_file = run_dir / "restarts.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and parent.poll() is None:
        if restarts_file.exists() and len(restarts_file.read_text().splitlines()) == 2:
            break  # the third attempt is resuming: stop it in its first step
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == REQUEUE_EXIT, out[-2000:] + err[-2000:]
    assert time.monotonic() - signalled < 60
    assert f"stopped for preemption with a checkpoint (exit status {REQUEUE_EXIT})" in out
    task_log = Path(re.search(r"^task log: (\S+)$", out, re.M).group(1)).read_text()
    logs = run_dir.resolve() / "logs"
    died = re.search(
        r"^restart 1/2: policy rank 1 on node (\S+) died \(log (\S+)\), during train", task_log, re.M
    )
    assert died and died.group(2) == str(logs / "policy_rank1.log"), task_log[-3000:]
    assert re.search(
        r"^restart 2/2: hang in train of step 3 \(stacks: .*hang_report_3\.txt\)", task_log, re.M
    )
    assert re.search(
        r"^stopped for preemption \(SIGTERM\) after step [3-5], checkpointed; exit 75", task_log, re.M
    )
    assert "Traceback" not in task_log and "Unhandled error" not in task_log, task_log[-3000:]

    # The report: found within the deadline, names the stuck rank and where it sleeps, has every stack.
    report = (run_dir / "hang_report_3.txt").read_text()
    ran, deadline_s = map(int, re.search(r"ran (\d+) s, past its deadline of (\d+) s", report).groups())
    assert deadline_s == 10 and ran <= deadline_s + 5, report[:500]
    assert re.search(r"^  policy_rank0 on \S+: fault_point <- fault_point \(inject\.py:\d+\)$", report, re.M)
    assert re.search(r"^  policy_rank1 on \S+: \S+ <- ", report, re.M)  # waiting for rank 0 somewhere
    assert 'megatron_rl/grpo/policy_worker.py", line' in report and "==== engine0 on " in report

    restarts = [json.loads(line) for line in restarts_file.read_text().splitlines()]
    assert [(r["restart"], r["resumed_from_step"], r["steps_redone"]) for r in restarts] == [
        (1, 2, 1),
        (2, 2, 0),
    ]
    stopped_at = rows(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:06d}").is_dir()
    assert (rows(run_dir)[-1]["fault/restarts"], rows(run_dir)[-1]["fault/steps_redone"]) == (2.0, 1.0)

    again = subprocess.run([*command, "--in-process"], capture_output=True, text=True, timeout=600, env=fault)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(run_dir, reference)  # every step once, the same figures
    assert max_weight_diff(run_dir, reference) <= 1e-6


def test_dead_rank_without_restarts_stops_naming_rank_node_and_log(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli(run_dir, "run.steps=1"), capture_output=True, text=True, timeout=600, env=env("logprobs:1:1:kill")
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    log = run_dir.resolve() / "logs" / "policy_rank1.log"
    first = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert re.fullmatch(
        rf"error: policy rank 1 on node \S+ died \(log {re.escape(str(log))}\), during logprobs; "
        r"run\.max_restarts=0: set run\.max_restarts=N to restart from the last checkpoint instead",
        first,
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_ctrl_c_stops_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = popen_interruptible(
        cli(run_dir, "run.steps=1000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    log = run_dir / "logs" / "policy_rank0.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not log.exists() and proc.poll() is None:
        time.sleep(0.2)  # the workers are starting
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # not stopped: the run must not go on training beside the next tests
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C): stopped"), err[-3000:]
