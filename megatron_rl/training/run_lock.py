"""One run per run directory: the process that owns a run holds `<run>/run.lock` for as long as it runs.

The lock is an exclusive `flock` on a file that stays open, so the kernel drops it when its process ends, however
it ends (kill -9 included); the file itself names the owner (host, pid, start time, command) for the error a
second run gets. A lock file left by a process that is gone is taken over, with a line saying whose it was.
Released (the file removed) when the owner leaves its `with` block, normally or by an exception.

Who owns the run: the process that runs the training (`--in-process`: the CLI itself, or the NeMo-Run task the
local launcher starts, or the job on Slurm). The launcher's own process only checks (`check_free`) before it
starts anything, so a second command on a busy directory stops at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError

LOCK_FILE = "run.lock"


class RunLock:
    """`with RunLock(run_dir):` holds the run directory for this process (created if missing)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir).absolute()
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Raises UserError naming the owner when another live process holds the directory."""
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise UserError(busy_message(self.dir, owner)) from None
            except OSError as exc:  # a file system without locks (some network mounts): run, but say so
                print(
                    f"run dir {self.dir}: its file system does not support file locks ({exc.strerror}); "
                    "a second run in this directory would not be stopped.",
                    file=sys.stderr,
                    flush=True,
                )
                break
            # The owner we waited on may have removed the file as it released it: lock the current one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous:
            print(stale_message(self.dir, previous), file=sys.stderr, flush=True)
        record = json.dumps(_this_process()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)  # still holding it: nobody can take the file being removed
        finally:
            os.close(fd)


def check_free(run_dir: str | Path) -> None:
    """Raises UserError when a live run holds `run_dir`; writes nothing (the directory may not exist yet)."""
    path = Path(run_dir).absolute() / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(busy_message(path.parent, _read_owner(fd))) from None
    except OSError:
        pass  # no locks on this file system: the run itself says so
    finally:
        os.close(fd)


def busy_message(run_dir: Path, owner: dict[str, Any] | None) -> str:
    who = describe(owner) if owner else "a run that is just starting"
    return (
        f"Run directory {run_dir} is in use by another run: {who}. Wait for it to end (or stop it), or choose "
        f"another run.name or run.dir. (Lock file: {run_dir / LOCK_FILE}.)"
    )


def stale_message(run_dir: Path, owner: dict[str, Any]) -> str:
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        why = f"process {pid} is gone"
    else:
        why = "its process no longer holds the lock"
    return f"run dir {run_dir}: taking over the lock of an earlier run ({describe(owner)}): {why}."


def describe(owner: dict[str, Any]) -> str:
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
    if owner.get("started"):
        text += f", started {owner['started']}"
    if owner.get("command"):
        text += f" ({owner['command']})"
    return text


def _this_process() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv])[:300],
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(fd: int) -> dict[str, Any] | None:
    """The owner recorded in the lock file; None when it is empty (its owner is writing it) or unreadable."""
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
