"""Slurm entries: polling through sacct/squeue/scancel, time limits, log discovery. No Slurm controller can
exist here, so stand-in sacct/squeue/scancel programs on PATH play it from a per-job list of states; the
launcher's submission is replaced by a scheduler subclass (the real one runs in the functional test)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest
from rich.console import Console

from megatron_rl.nightly.runner import run_entries
from megatron_rl.nightly.slurm import Scheduler, find_log
from megatron_rl.nightly.suite import Suite, load_suite

SACCT = """
import os, sys
job = sys.argv[sys.argv.index("-j") + 1]
d = os.environ["FAKE_SLURM_DIR"]
try:
    states = open(f"{d}/{job}.states").read().split()
except FileNotFoundError:
    sys.exit(0)  # accounting has not heard of the job yet
pos_file = f"{d}/{job}.pos"
pos = int(open(pos_file).read()) if os.path.exists(pos_file) else 0
print(states[min(pos, len(states) - 1)])
open(pos_file, "w").write(str(pos + 1))
"""
SCANCEL = """
import os, sys
d = os.environ["FAKE_SLURM_DIR"]
open(f"{d}/{sys.argv[1]}.states", "w").write("CANCELLED")
open(f"{d}/{sys.argv[1]}.cancelled", "w").write("")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm_state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in (("sacct", SACCT), ("scancel", SCANCEL), ("squeue", "")):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return state


class PlayedScheduler(Scheduler):
    """Submits by registering the job's states with the fake controller and writing what the job would."""

    def __init__(self, state_dir: Path, plans: dict[str, dict]) -> None:
        self.state_dir, self.plans, self.next_id = state_dir, plans, 1000

    def submit(self, entry, run_dir):
        plan = self.plans[entry.name]
        if plan.get("reject"):
            raise RuntimeError("sbatch: error: Batch job submission failed: Invalid account")
        self.next_id += 1
        job = str(self.next_id)
        (self.state_dir / f"{job}.states").write_text("\n".join(plan["states"]))
        rows = [
            {"step": s, "reward/mean": 0.5, "memory/peak_gb": plan.get("mem", 40.0)}
            for s in range(1, plan["steps"] + 1)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        logs = run_dir / "slurm"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"sbatch_megatron-rl-grpo-{entry.name}_{job}.out").write_text("sbatch preamble\n")
        (logs / f"log-megatron-rl-grpo-{entry.name}_{job}_0.out").write_text(plan.get("log", "training\n"))
        return job


def suite_of(tmp_path: Path, entries: str) -> Suite:
    path = tmp_path / "gpu.yaml"
    path.write_text(
        "launcher: slurm\ndefaults: {steps: 3, nodes: 2, timeout_s: 1, queue_timeout_s: 1, "
        "assertions: ['max(memory/peak_gb) < 75']}\nentries:\n" + entries
    )
    return load_suite(str(path))


def test_slurm_jobs_polled_to_the_end(tmp_path, fake_slurm):
    suite = suite_of(
        tmp_path,
        "".join(
            f"  - {{name: {n}, recipe: llama8b, timeout_s: {t}}}\n"
            for n, t in (
                ("ok", 60),
                ("oom", 60),
                ("short", 60),
                ("stuck", 1),
                ("queued", 60),
                ("rejected", 60),
                ("fat", 60),
            )
        ),
    )
    plans = {
        "ok": {"states": ["PENDING", "RUNNING", "RUNNING", "COMPLETED"], "steps": 3},
        "oom": {
            "states": ["RUNNING", "OUT_OF_MEMORY"],
            "steps": 1,
            "log": "torch.OutOfMemoryError: CUDA out of memory\n",
        },
        # The job ended COMPLETED (the script swallowed the failure) but logged 2 of 3 steps.
        "short": {"states": ["RUNNING", "COMPLETED"], "steps": 2},
        "stuck": {"states": ["RUNNING"], "steps": 1},
        "queued": {"states": ["PENDING"], "steps": 0},
        "rejected": {"reject": True},
        "fat": {"states": ["COMPLETED"], "steps": 3, "mem": 79.5},
    }
    # The queue limit applies to the one entry that never leaves PENDING; give the others room.
    for e in suite.entries:
        e.queue_timeout_s = 1.0 if e.name == "queued" else 60.0
    results, interrupted = run_entries(
        suite, suite.entries, "slurm", tmp_path / "runs", Console(quiet=True), poll_s=0.3,
        scheduler=PlayedScheduler(fake_slurm, plans),
    )  # fmt: skip
    assert not interrupted
    by = {r.entry.name: r for r in results}
    assert {n: r.status for n, r in by.items()} == {
        "ok": "passed",
        "oom": "error",
        "short": "failed",
        "stuck": "timeout",
        "queued": "timeout",
        "rejected": "error",
        "fat": "failed",
    }
    assert re.fullmatch(
        rf"Slurm job {by['ok'].job_id} ended COMPLETED \(queued \d+ s, ran \d+ s\)", by["ok"].detail
    )
    assert "ended OUT_OF_MEMORY" in by["oom"].detail and "CUDA out of memory" in by["oom"].log_tail
    assert by["oom"].log_path.name.startswith("log-")  # the srun step's log, not sbatch's preamble
    assert [a.message for a in by["short"].failed_assertions] == ["last(step) = 2, expected >= 3"]
    assert "timed out after 1 s of running" in by["stuck"].detail
    assert (fake_slurm / f"{by['stuck'].job_id}.cancelled").exists()
    assert "still queued after 1 s" in by["queued"].detail
    assert (fake_slurm / f"{by['queued'].job_id}.cancelled").exists()
    assert not (fake_slurm / f"{by['ok'].job_id}.cancelled").exists()
    assert "Invalid account" in by["rejected"].detail and by["rejected"].job_id is None
    assert by["fat"].failed_assertions[0].observed == 79.5


def test_find_log(tmp_path):
    run = tmp_path / "run"
    assert find_log(run, "7") is None
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "sbatch_x_7.out").write_text("pre\n")
    assert find_log(run, "7").name == "sbatch_x_7.out"
    (run / "slurm" / "log-x_7_0.out").write_text("")  # empty: not useful yet
    assert find_log(run, "7").name == "sbatch_x_7.out"
    (run / "slurm" / "log-x_7_0.out").write_text("step 1\n")
    assert find_log(run, "7").name == "log-x_7_0.out"
    assert find_log(run, "8") is None
