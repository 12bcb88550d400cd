"""One suite entry as a Slurm job: the launcher renders and submits it, sacct reports on it, logs are found
in its run directory."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from pathlib import Path

from megatron_rl.errors import UserError
from megatron_rl.nightly.local import Outcome
from megatron_rl.nightly.suite import Entry

# sacct states after which a job never runs again; anything else (PENDING, RUNNING, REQUEUED...) is in flight.
TERMINAL = {
    "COMPLETED": "completed",
    "TIMEOUT": "timeout",
    "FAILED": "failed",
    "CANCELLED": "failed",
    "OUT_OF_MEMORY": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "PREEMPTED": "failed",
}


def render_script(entry: Entry, run_dir: Path) -> str:
    """The sbatch script the launcher would submit for this entry (its --dry-run output)."""
    if entry.recipe is None:
        raise UserError(f"entry {entry.name!r} runs a custom command, which only the local launcher can run.")
    overrides = [*entry.launcher_overrides(run_dir), "cluster.launcher=slurm"]
    try:
        from megatron_rl.config.compose import compose
        from megatron_rl.launch import slurm as launcher

        in_process = list(inspect.signature(launcher.render).parameters)[:4] == [
            "cfg",
            "algo",
            "recipe",
            "overrides",
        ]
    except (ImportError, AttributeError):
        in_process = False
    if not in_process:  # the launcher's public contract: `--dry-run` prints the script on stdout
        return _render_subprocess(entry, overrides)
    cfg = compose(entry.recipe, overrides)
    if hasattr(launcher, "check_layout"):
        launcher.check_layout(cfg)
    return launcher.render(cfg, entry.algo, entry.recipe, overrides)


def _render_subprocess(entry: Entry, overrides: list[str]) -> str:
    cmd = [
        sys.executable,
        "-m",
        "megatron_rl.launch",
        entry.algo,
        f"conf={entry.recipe}",
        *overrides,
        "--dry-run",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"entry {entry.name!r}: the launcher could not render its Slurm script: {tail}")
    return proc.stdout


_JOB_ID = re.compile(r"submitted\b.*?\bjob (\d+)", re.I)


def find_log(run_dir: Path, job_id: str | None) -> Path | None:
    """The job's most useful log: the srun step's output (the training's own output) before sbatch's.
    Found by job id under <run>/slurm/, so it does not depend on the launcher's template details."""
    root = run_dir / "slurm"
    if job_id is None or not root.is_dir():
        return None
    hits = [p for p in root.rglob(f"*{job_id}*") if p.is_file() and p.stat().st_size]
    if not hits:
        return None
    return max(hits, key=lambda p: (not p.name.startswith("sbatch"), p.stat().st_mtime))


class Scheduler:
    """Submission through the launcher, then the Slurm commands the runner polls with. Tests put stand-ins
    for sbatch/sacct/squeue/scancel on PATH."""

    def submit(self, entry: Entry, run_dir: Path) -> str:
        """`python -m megatron_rl.launch ALGO conf=RECIPE ... cluster.launcher=slurm`: the launcher writes the
        script into <run>/slurm/ and calls sbatch; the job id is read back from what it printed."""
        cmd = [
            sys.executable,
            "-m",
            "megatron_rl.launch",
            entry.algo,
            f"conf={entry.recipe}",
            *entry.launcher_overrides(run_dir),
            "cluster.launcher=slurm",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        (run_dir / "submit.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        found = _JOB_ID.search(proc.stdout + proc.stderr)
        id_file = run_dir / "slurm" / "job_id"  # the launcher also records it there
        if proc.returncode == 0 and not found and id_file.is_file():
            return id_file.read_text().strip()
        if proc.returncode or not found:
            tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise RuntimeError(f"the launcher did not submit (exit {proc.returncode}): {tail}")
        return found.group(1)

    def state(self, job_id: str) -> str:
        proc = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        words = proc.stdout.split()
        if proc.returncode == 0 and words:
            return words[0]  # "CANCELLED by 1234" -> CANCELLED
        # Just-submitted jobs can be missing from accounting for a few seconds; squeue knows them.
        proc = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return proc.stdout.split()[0] if proc.returncode == 0 and proc.stdout.split() else "UNKNOWN"

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60, check=False)


class SlurmRun:
    # A job neither sacct nor squeue has heard of for this long is taken as gone (purged from the queue).
    UNKNOWN_GRACE_S = 600.0

    def __init__(self, entry: Entry, run_dir: Path, scheduler: Scheduler) -> None:
        self.entry, self.run_dir, self.scheduler = entry, run_dir, scheduler
        self.job_id: str | None = None
        self.submitted: float | None = None
        self.started: float | None = None
        self.unknown_since: float | None = None
        self.state = "NEW"

    @property
    def log_path(self) -> Path | None:
        return find_log(self.run_dir, self.job_id) or (
            self.run_dir / "submit.log" if (self.run_dir / "submit.log").is_file() else None
        )

    def describe(self) -> str:
        return f"Slurm job {self.job_id} (run dir {self.run_dir})"

    def start(self) -> Outcome | None:
        if self.entry.recipe is None:
            return Outcome("failed", "a custom `command` entry cannot run on Slurm")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.job_id = self.scheduler.submit(self.entry, self.run_dir)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return Outcome("failed", f"submission failed: {exc}")
        self.submitted = time.monotonic()
        return None

    def running_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def poll(self) -> Outcome | None:
        assert self.job_id is not None and self.submitted is not None
        state = self.scheduler.state(self.job_id)
        now = time.monotonic()
        self.state = state
        if state in TERMINAL:
            ran = now - self.started if self.started is not None else 0.0
            queued = (self.started or now) - self.submitted
            return Outcome(
                TERMINAL[state],
                f"Slurm job {self.job_id} ended {state} (queued {queued:.0f} s, ran {ran:.0f} s)",
            )
        if state == "UNKNOWN":
            self.unknown_since = self.unknown_since or now
            if now - self.unknown_since > self.UNKNOWN_GRACE_S:
                return Outcome(
                    "failed", f"Slurm job {self.job_id} vanished (neither sacct nor squeue knows it)"
                )
            return None
        self.unknown_since = None
        if state == "RUNNING" and self.started is None:
            self.started = now
        if self.started is None and now - self.submitted > self.entry.queue_timeout_s:
            self.cancel()
            return Outcome("timeout", f"still queued after {self.entry.queue_timeout_s:g} s; job cancelled")
        if self.started is not None and now - self.started > self.entry.timeout_s:
            self.cancel()
            return Outcome("timeout", f"timed out after {self.entry.timeout_s:g} s of running; job cancelled")
        return None

    def cancel(self) -> None:
        if self.job_id is not None:
            self.scheduler.cancel(self.job_id)
