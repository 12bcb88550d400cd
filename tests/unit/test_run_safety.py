"""Run safety without a training: the run-directory lock, processes that die with their run, checkpoints that
cannot be resumed from (corrupt or missing trainer state), and metrics rows that are whole or absent.
The real run killed with SIGKILL is in tests/functional/test_run_processes.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.errors import UserError
from megatron_rl.training.checkpoints import STATE_FILE, TENSORS_FILE, CheckpointManager
from megatron_rl.training.run_lock import LOCK_FILE, RunLock, check_free

HOLD = """
import sys, time
from megatron_rl.training.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(run_dir: Path, seconds: float = 60) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


# ---------------------------------------------------------------------------------------------- the lock
def test_second_run_is_refused_naming_the_owner(tmp_path):
    owner = _holder(tmp_path / "run")
    try:
        for attempt in (lambda: RunLock(tmp_path / "run").acquire(), lambda: check_free(tmp_path / "run")):
            with pytest.raises(UserError) as err:
                attempt()
            msg = str(err.value)
            assert f"pid {owner.pid} on host {socket.gethostname()}" in msg and "in use by another run" in msg
            assert "run.name or run.dir" in msg and str(tmp_path / "run") in msg
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        owner.kill()
        owner.wait()


def test_cli_refuses_a_busy_run_directory_before_writing_anything(tmp_path, capsys):
    from megatron_rl.launch.__main__ import main

    owner = _holder(tmp_path)
    try:
        assert main(["sft", "conf=sft_tiny", f"run.dir={tmp_path}", "--in-process"]) == 2
    finally:
        owner.kill()
        owner.wait()
    err = capsys.readouterr().err
    assert (
        err.startswith("error: Run directory") and f"pid {owner.pid} on host" in err and err.count("\n") == 1
    )
    assert not (tmp_path / "config.yaml").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_and_said(tmp_path, capsys):
    owner = _holder(tmp_path, seconds=60)
    os.kill(owner.pid, signal.SIGKILL)  # no chance to release: the file stays, naming it
    owner.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == owner.pid
    check_free(tmp_path)  # the kernel dropped its flock: free
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock of an earlier run (pid {owner.pid} on host {socket.gethostname()}" in err
    assert f"process {owner.pid} is gone" in err
    assert not (tmp_path / LOCK_FILE).exists()  # released: removed


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(ValueError), RunLock(tmp_path):
        raise ValueError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    other = _holder(tmp_path, seconds=0)  # another process takes it at once
    other.wait()


def test_a_file_system_without_locks_runs_and_says_so(tmp_path, monkeypatch, capsys):
    import errno

    from megatron_rl.training import run_lock

    def no_locks(fd, op):  # what flock gives on a network mount without lock support
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    check_free(tmp_path)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "does not support file locks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- process lifetime
OWNER = """
import subprocess, sys, time
from megatron_rl.process_lifetime import run_processes
with run_processes():
    # a grandchild in a session of its own (as Ray's workers are): a process-group kill would miss it
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print(sleeper.pid, flush=True)
    if sys.argv[1] == "kill":
        time.sleep(600)
"""


@pytest.mark.parametrize("end", ["kill", "orderly"])
def test_processes_a_run_leaves_are_stopped(end):
    """Killed: the watcher stops the rest and says so. Ended in order (an error, Ctrl-C): it stops the rest
    quietly, so the run's own last line stays the last line."""
    import psutil

    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, end], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sleeper = psutil.Process(int(owner.stdout.readline()))
    if end == "kill":
        os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while sleeper.is_running() and sleeper.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = sleeper.is_running() and sleeper.status() != psutil.STATUS_ZOMBIE
    if alive:
        sleeper.kill()
    assert not alive, "the owner's grandchild outlived it"
    said = f"the run's process {owner.pid} ended; stopped 1 process it left: {sleeper.pid} "
    assert (said in owner.stderr.read()) == (end == "kill")


def test_a_spawned_rank_dies_with_its_parent():
    import psutil

    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'from megatron_rl.process_lifetime import die_with_parent;"
        " die_with_parent(); print(1, flush=True); import time; time.sleep(600)'], stdout=subprocess.PIPE)\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    try:
        child.wait(timeout=5)
    except psutil.TimeoutExpired:
        child.kill()
        pytest.fail("the child outlived its parent")


# ------------------------------------------------------------------------------------------ checkpoints
def _save(mgr: CheckpointManager, step: int) -> Path:
    def policy(path: str) -> None:
        os.makedirs(path)
        Path(path, "weights").write_text(f"step {step}")

    return mgr.save(step, policy, {"data": {"position": step}})


def test_corrupt_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 2)
    bad = _save(mgr, 4)
    (bad / STATE_FILE).write_text('{"step": 4, "data": ')  # cut short
    with pytest.raises(UserError, match=rf"{bad / STATE_FILE} is not valid JSON"):
        CheckpointManager.state(bad)
    assert mgr.latest().name == "step_000002"
    assert mgr.resume_from(None).name == "step_000002"
    err = capsys.readouterr().err
    assert f"{bad / STATE_FILE} is not valid JSON" in err
    assert "moved aside to step_000004.bad; resuming from step_000002" in err
    assert (tmp_path / "step_000004.bad" / "policy" / "weights").read_text() == "step 4"  # kept for a look
    assert mgr.state(tmp_path / "step_000002")["data"] == {"position": 2}


def test_corrupt_only_checkpoint_says_how_to_start_over(tmp_path):
    mgr = CheckpointManager(tmp_path)
    bad = _save(mgr, 2)
    (bad / STATE_FILE).write_text("not json")
    with pytest.raises(UserError) as err:
        mgr.resume_from(None)
    msg = str(err.value)
    assert str(bad / STATE_FILE) in msg and "run.resume=false" in msg and "run.name or run.dir" in msg
    assert mgr.resume_from(False) is None


def test_checkpoint_without_trainer_state_is_never_latest_nor_silently_replaced(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path)
    partial = tmp_path / "step_000004"
    (partial / "policy").mkdir(parents=True)  # a save that stopped before its trainer state
    with pytest.raises(UserError, match=r"step_000004 has no trainer_state.json .* run.resume=false"):
        mgr.resume_from(None)  # not a silent start at step 0 that would overwrite it
    assert mgr.latest() is None
    # Started over (run.resume=false): the new step 4 replaces it, said so, through a rename.
    _save(mgr, 4)
    assert (
        "step_000004 has no trainer_state.json (a save that did not finish): replaced"
        in capsys.readouterr().err
    )
    assert mgr.state(partial)["step"] == 4 and (partial / "policy" / "weights").read_text() == "step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004"]  # no .tmp or .old left
    # Behind a complete one: moved aside at resume, the complete one is used.
    _save(mgr, 6)
    (tmp_path / "step_000008" / "policy").mkdir(parents=True)
    assert mgr.resume_from(None).name == "step_000006"
    assert "step_000008 has no trainer_state.json" in capsys.readouterr().err
    assert (tmp_path / "step_000008.bad").is_dir() and not (tmp_path / "step_000008").exists()


def test_trainer_state_arrays_live_beside_the_json_and_a_missing_one_is_named(tmp_path, capsys):
    import torch

    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 2)
    ids = torch.arange(5, dtype=torch.int64)
    ckpt = mgr.save(4, os.makedirs, {"data": {"position": 4}, "tensors": {"buffer/token_ids": ids}})
    assert json.loads((ckpt / STATE_FILE).read_text())["tensors"] == ["buffer/token_ids"]
    state = CheckpointManager.state(ckpt)
    assert torch.equal(state["tensors"]["buffer/token_ids"], ids) and state["data"] == {"position": 4}
    assert "tensors" not in CheckpointManager.state(tmp_path / "step_000002")
    # The JSON lists a tensor the file lacks: named at resume.
    from safetensors.torch import save_file

    save_file({"other": ids}, str(ckpt / TENSORS_FILE))
    with pytest.raises(UserError, match=rf"{ckpt / TENSORS_FILE} lacks buffer/token_ids"):
        CheckpointManager.state(ckpt)
    # The file is gone: not resumable, the run falls back to the previous checkpoint.
    (ckpt / TENSORS_FILE).unlink()
    assert mgr.resume_from(None).name == "step_000002"
    assert f"has no {TENSORS_FILE}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- metrics
def _run_dir(tmp_path: Path):
    from megatron_rl.config.compose import compose
    from megatron_rl.training.run_dir import RunDir

    return RunDir(compose("tiny", [f"run.dir={tmp_path}", "logger.wandb=false"]))


def test_metrics_cut_short_by_a_kill_resume_whole(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert not list(tmp_path.glob(".config.yaml*"))  # config.yaml through a temp file and a rename
    run.start_logging(-1)
    for step in (1, 2, 3):
        run.log(step, {"reward/mean": 0.5})
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "reward/me')  # what a torn write would leave
    run.start_logging(2)
    assert [json.loads(r)["step"] for r in metrics.read_text().splitlines()] == [1, 2]
    assert "metrics.jsonl:4: dropping a line cut short" in capsys.readouterr().err
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{broken", lines[1]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        run.start_logging(2)


APPEND = """
import sys
from pathlib import Path
from megatron_rl.training.run_dir import append_line
for i in range(int(sys.argv[3])):
    append_line(Path(sys.argv[1]), '{"step": %d, "pad": "%s"}' % (i, sys.argv[2] * 100000))
"""


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_lines_are_whole_with_two_writers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", APPEND, str(path), c, "30"]) for c in "ab"]
    assert [w.wait() for w in writers] == [0, 0]
    rows = _rows(path)  # every line parses: no row split by the other writer's
    assert sorted((r["pad"][0], r["step"]) for r in rows) == [(c, i) for c in "ab" for i in range(30)]


def test_metrics_lines_are_whole_after_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", APPEND, str(path), "a", "100000"])
    deadline = time.monotonic() + 20
    while (not path.exists() or path.stat().st_size < 3_000_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.kill()
    writer.wait()
    *whole, last = path.read_bytes().split(b"\n")
    assert len(whole) >= 20 and [json.loads(line)["step"] for line in whole] == list(range(len(whole)))
    assert not last.endswith(b"}")  # at most a torn end (a kill inside one write), which resume drops
