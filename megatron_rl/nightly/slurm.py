"""One suite entry as a Slurm job: the launcher's own renderer and submission (megatron_rl.launch.slurm, called
in this process), sacct reports on it, logs are found in its run directory."""

from __future__ import annotations

import io
import shlex
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

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


def _composed(entry: Entry, run_dir: Path) -> tuple[Any, list[str]]:
    """The entry's config as the launcher composes it for Slurm, its layout checked."""
    if entry.recipe is None:
        raise UserError(f"entry {entry.name!r} runs a custom command, which only the local launcher can run.")
    from megatron_rl.config.compose import compose
    from megatron_rl.launch.preflight import preflight

    overrides = [*entry.launcher_overrides(run_dir), "cluster.launcher=slurm"]
    cfg = compose(entry.recipe, overrides, command=entry.algo)
    preflight(cfg, entry.algo, local=False)
    return cfg, overrides


def render_script(entry: Entry, run_dir: Path) -> str:
    """The sbatch script the launcher would submit for this entry (its --dry-run output)."""
    from megatron_rl.launch.slurm import render

    cfg, overrides = _composed(entry, run_dir)
    return render(cfg, entry.algo, entry.recipe, overrides)


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
        """What `python -m megatron_rl.launch ALGO conf=RECIPE ... cluster.launcher=slurm` does: the launcher
        writes the script into <run>/slurm/ and calls sbatch; its output goes to <run>/submit.log."""
        from megatron_rl.launch.slurm import submit

        out = io.StringIO()
        try:
            cfg, overrides = _composed(entry, run_dir)
            out.write(
                f"$ python -m megatron_rl.launch {entry.algo} conf={entry.recipe} {shlex.join(overrides)}\n"
            )
            with redirect_stdout(out), redirect_stderr(out):
                submit(cfg, entry.algo, overrides, dry_run=False)
        except UserError as exc:
            out.write(f"error: {exc}\n")
            raise RuntimeError(f"the launcher did not submit: {exc}") from None
        finally:
            (run_dir / "submit.log").write_text(out.getvalue())
        return (run_dir / "slurm" / "job_id").read_text().strip()

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
