"""Console policy: a worker's output (Python and C level) lands in its log file when quiet and on the console
when verbose; the controller's expected fallback warnings are silenced only when quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl import console

# A worker: redirects, then writes through Python, through raw fds 1 and 2, and from a child process (as C/C++
# code and subprocesses do, bypassing sys.stdout), then one line to the terminal it started with.
WORKER = """
import os, subprocess, sys
from megatron_rl import console
path = console.redirect_to_log("policy_rank0")
print("python stdout")
print("python stderr", file=sys.stderr)
os.write(1, b"fd1 write\\n")
os.write(2, b"fd2 write\\n")
subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
term = console.terminal()
if term is not None:
    term.print("progress bar line")
print("redirected to", path, file=sys.__stdout__, flush=True)
"""

WRITTEN = ("python stdout", "python stderr", "fd1 write", "fd2 write", "child stdout", "child stderr")


def _worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (console.VERBOSE_ENV, console.LOG_DIR_ENV)}
    return subprocess.run(
        [sys.executable, "-c", WORKER], env={**full, **env}, capture_output=True, text=True, timeout=60
    )


def test_quiet_worker_output_goes_to_its_log_file_at_fd_level(tmp_path):
    logs = tmp_path / "logs"
    proc = _worker(tmp_path, **{console.LOG_DIR_ENV: str(logs)})
    assert proc.returncode == 0, proc.stderr
    log = (logs / "policy_rank0.log").read_text()
    for text in WRITTEN:
        assert text in log, text
        assert text not in proc.stdout + proc.stderr, text
    assert log.startswith("#### megatron-rl worker log: policy_rank0 pid=")
    assert "progress bar line" in proc.stdout and "progress bar line" not in log  # the original stdout
    assert proc.stderr == ""


def test_verbose_worker_output_stays_on_the_console(tmp_path):
    logs = tmp_path / "logs"
    proc = _worker(tmp_path, **{console.LOG_DIR_ENV: str(logs), console.VERBOSE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    for text in WRITTEN:
        assert text in proc.stdout + proc.stderr, text
    assert "redirected to None" in proc.stdout
    assert not logs.exists()


def test_a_worker_without_a_run_directory_is_left_alone(tmp_path):
    proc = _worker(tmp_path)
    assert "python stdout" in proc.stdout and "redirected to None" in proc.stdout


CONTROLLER = """
import sys, warnings
from megatron_rl import console
console.configure(verbose_flag="--verbose" in sys.argv)
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("a warning that means something")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_controller_silences_expected_fallback_warnings_unless_verbose(verbose):
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    argv = [sys.executable, "-c", CONTROLLER] + (["--verbose"] if verbose else [])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "a warning that means something" in proc.stderr
    assert ("Transformer Engine and Apex" in proc.stderr) == verbose


def test_use_run_dir_announces_the_logs_once_and_carries_them_to_actors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.delenv(console.LOG_DIR_ENV, raising=False)
    run = tmp_path / "run"
    folder = console.use_run_dir(run)
    console.use_run_dir(run)
    out = capsys.readouterr().out.splitlines()
    assert folder == (run / "logs").resolve() and folder.is_dir()
    assert out == [console.logs_line(run)] and str(folder) in out[0]
    assert console.log_dir() == folder
    assert console.actor_env() == {console.LOG_DIR_ENV: str(folder)}

    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.use_run_dir(tmp_path / "other") is None
    assert console.log_dir() is None and console.logs_line(run) is None
    assert capsys.readouterr().out == ""
    assert console.actor_env() == {console.VERBOSE_ENV: "1"}


def test_a_workers_log_is_found_by_pid_or_actor_and_its_tail_shown(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path))
    (tmp_path / "engine.log").write_text(
        "#### megatron-rl worker log: engine pid=41 actor=abc at 2026-01-01 00:00:00\nold attempt\n"
        "#### megatron-rl worker log: engine pid=42 actor=def at 2026-01-01 00:01:00\n"
        + "".join(f"line {i}\n" for i in range(30))
        + "Fatal Python error: Segmentation fault\n"
    )
    (tmp_path / "policy_rank0.log").write_text(
        "#### megatron-rl worker log: policy_rank0 pid=7 actor=- at x\n"
    )
    assert console.find_log(pid=42) == tmp_path / "engine.log"
    assert console.find_log(actor_id="abc") == tmp_path / "engine.log"
    assert console.find_log(pid=7) == tmp_path / "policy_rank0.log"
    assert console.find_log(pid=4) is None  # "pid=4" must not match "pid=42"
    hint = console.log_hint(console.find_log(pid=42), tail_lines=3)
    assert hint.startswith(f"; its log: {tmp_path / 'engine.log'}; its last lines:")
    assert hint.splitlines()[-1].strip() == "Fatal Python error: Segmentation fault"
    assert "line 27" not in hint and "line 29" in hint
    assert console.log_hint(None) == f"; worker logs: {tmp_path}/"


def test_verbose_reaches_a_slurm_job(monkeypatch, capsys):
    from megatron_rl.launch.__main__ import main

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)  # restored after the test: main() sets it
    assert main(["grpo", "conf=llama70b", "--dry-run"]) == 0
    assert console.VERBOSE_ENV not in capsys.readouterr().out
    assert main(["grpo", "conf=llama70b", "--dry-run", "--verbose"]) == 0
    assert f"export {console.VERBOSE_ENV}=1" in capsys.readouterr().out
