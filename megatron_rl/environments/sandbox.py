"""Run model-written Python in a separate, limited process; the caller survives whatever the code does.

    result = run_python("print(6 * 7)")              # SandboxResult(ok=True, stdout="42\\n", ...)
    result = await arun_python(code, SandboxLimits(timeout_s=2))   # from asyncio, without blocking the loop
    python -m megatron_rl.environments.sandbox FILE  # one JSON object: ok, timed_out, exit_code, stdout, ...

Each run gets a fresh interpreter (`-I -S -B -u`: no site-packages, no PYTHON* variables, no bytecode files)
in a new session, a scrubbed environment, stdin from /dev/null, and its own temporary working directory that
is deleted afterwards. Limits: wall clock (the whole process tree is killed), CPU seconds, address space,
open files, file size, number of processes, and output (read incrementally; past the cap the program is
stopped). sandbox_child.py applies them in the child before the code runs, and reports what it enforced.

Where the trainer runs as root (CI, most containers), the child drops to a fresh random uid: the process
limit (per uid in Linux) then counts only this run's processes, root's private files are unreadable, and
every process of that uid is killed at the end, even ones that left the session. Network: a new network
namespace where the OS allows it, else Landlock's TCP rules, else not enforced (`enforced["network"]` says
which). Writes outside the working directory: Landlock where the kernel has it, else an audit hook that
determined code can get around. docs/agents.md lists what is and is not enforced.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError

_CHILD = Path(__file__).with_name("sandbox_child.py")
_SCRIPT = "main.py"
_POLL_S = 0.02


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, whole process tree
    cpu_s: int = 10  # per process (RLIMIT_CPU)
    memory_mb: int = 512  # address space per process (RLIMIT_AS)
    max_processes: int = 16  # RLIMIT_NPROC for the run's own uid (see module doc)
    file_size_mb: int = 16  # largest file the code may write (RLIMIT_FSIZE)
    max_open_files: int = 64
    max_output_bytes: int = 65536  # per stream; more and the program is stopped
    network: bool = False
    python: str | None = None  # interpreter; None picks one the sandbox uid can read


@dataclass
class SandboxResult:
    ok: bool
    timed_out: bool
    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None
    enforced: dict[str, Any] = field(default_factory=dict)  # what the child could enforce (network, writes)
    seconds: float = 0.0
    workdir: str = ""  # where it ran (already deleted)

    def summary(self) -> dict[str, Any]:
        """The CLI's JSON object."""
        keys = ("ok", "timed_out", "exit_code", "stdout", "stderr", "error")
        return {k: v for k, v in asdict(self).items() if k in keys}


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as the main script of a sandboxed interpreter and wait for it (blocking)."""
    limits = limits or SandboxLimits()
    workdir = tempfile.mkdtemp(prefix="mrl-sandbox-", dir=_base_dir(os.geteuid() == 0))
    try:
        result = _run_in(workdir, code, limits)
    finally:
        _remove_tree(workdir)
    result.workdir = workdir
    return result


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


async def arun_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """`run_python` on a thread of the sandbox's own pool: other coroutines keep running meanwhile."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            # Threads only wait on pipes and the child; the default executor's few workers would serialize
            # concurrent episodes' tool calls.
            _EXECUTOR = ThreadPoolExecutor(max_workers=64, thread_name_prefix="sandbox")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_EXECUTOR, functools.partial(run_python, code, limits))


def _run_in(workdir: str, code: str, limits: SandboxLimits) -> SandboxResult:
    start = time.monotonic()
    script = Path(workdir) / _SCRIPT
    script.write_text(code, encoding="utf-8")
    uid = _fresh_uid() if os.geteuid() == 0 else None
    if uid is not None:
        for path in (workdir, script):
            os.chown(path, uid, uid)
    python = limits.python or _interpreter(uid is not None)
    settings = {
        "workdir": workdir,
        "script": _SCRIPT,
        "uid": uid,
        "cpu_s": max(1, int(limits.cpu_s)),
        "memory_bytes": limits.memory_mb << 20,
        "file_size_bytes": limits.file_size_mb << 20,
        "max_open_files": limits.max_open_files,
        # Linux counts processes per uid: under a fresh uid the limit is the run's own; otherwise it has
        # to include what this user already runs.
        "nproc": limits.max_processes + (0 if uid is not None else _count_processes(os.getuid())),
        "network_off": not limits.network,
    }
    status_r, status_w = os.pipe()
    settings["status_fd"] = status_w
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    argv = [python, "-I", "-S", "-B", "-u", "-c", _CHILD.read_text(), json.dumps(settings)]
    try:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, pass_fds=(status_w,),
        )
    except OSError as exc:
        os.close(status_r)
        os.close(status_w)
        return SandboxResult(False, False, None, "", "", f"sandbox could not start {python}: {exc}")
    os.close(status_w)
    overflow = threading.Event()
    readers = [_CappedReader(s, limits.max_output_bytes, overflow) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    timed_out = False
    deadline = start + limits.timeout_s
    while proc.poll() is None:
        if overflow.wait(_POLL_S):
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
    _kill_all(proc, uid)
    for r in readers:
        r.join(timeout=2.0)
    with os.fdopen(status_r) as f:
        status_line = f.read()
    enforced = json.loads(status_line) if status_line.strip() else {}
    out, err = readers[0].text(), readers[1].text()
    error = _explain(proc.returncode, timed_out, overflow.is_set(), err, enforced, limits)
    return SandboxResult(
        ok=error is None, timed_out=timed_out, exit_code=proc.returncode, stdout=out, stderr=err,
        error=error, enforced=enforced, seconds=time.monotonic() - start,
    )


class _CappedReader(threading.Thread):
    """Keeps the first `cap` bytes of a pipe and drains the rest, so the child never blocks on a full pipe
    and memory stays bounded whatever it prints; past the cap it sets `overflow`."""

    def __init__(self, stream: Any, cap: int, overflow: threading.Event) -> None:
        super().__init__(daemon=True)
        self.fd, self.cap, self.overflow = stream.fileno(), cap, overflow
        self.stream, self.buf, self.total = stream, bytearray(), 0

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                if len(self.buf) < self.cap:
                    self.buf += chunk[: self.cap - len(self.buf)]
                self.total += len(chunk)
                if self.total > self.cap:
                    self.overflow.set()
        finally:
            self.stream.close()

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def _explain(
    rc: int | None, timed_out: bool, overflow: bool, stderr: str, enforced: dict, limits: SandboxLimits
) -> str | None:
    """One line for the model and the logs: what stopped the program, in terms of the limit it hit."""
    # Several processes may have written tracebacks at once: the last line that names an error.
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln[0].isspace()]
    named = [ln for ln in lines if not ln.startswith("Traceback")]
    last = (named or lines or [""])[-1]
    if overflow:
        return f"output limit exceeded: more than {limits.max_output_bytes} bytes; the program was stopped"
    if timed_out:
        return f"timed out after {limits.timeout_s:g} s (wall clock); the program was stopped"
    if not enforced:
        return f"sandbox set-up failed: {last or f'exit code {rc}'}"
    if rc is None or rc == 0:
        return None
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"CPU time limit exceeded ({limits.cpu_s} s); the program was stopped"
    if rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    if last.startswith("MemoryError"):
        return f"memory limit exceeded ({limits.memory_mb} MB): {last}"
    if "BlockingIOError" in stderr or "Resource temporarily unavailable" in stderr:
        return f"process limit reached ({limits.max_processes} processes): {last}"
    if "File too large" in stderr:
        return f"file size limit exceeded ({limits.file_size_mb} MB): {last}"
    return f"exit code {rc}: {last}" if last else f"exit code {rc}"


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the run's session and, under a fresh uid, every process of that uid (a child may have left the
    session with setsid; a fork bomb keeps forking while it is being killed, hence the rounds)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        for _ in range(200):
            pids = _live_pids(uid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)
    proc.wait()


def _live_pids(uid: int) -> list[int]:
    """Processes whose real uid is `uid` and that are not zombies (those hold nothing but a pid)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith(
            ("Z", "X")
        ):
            pids.append(int(entry.name))
    return pids


def _count_processes(uid: int) -> int:
    return sum(
        1
        for entry in os.scandir("/proc")
        if entry.name.isdigit() and _owner(entry.path) == uid
    )


def _owner(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def _fresh_uid() -> int:
    """A uid no account uses (above the ranges distributions and container maps hand out), new per run so
    that runs never share a process count or kill each other's processes."""
    return 1_000_000 + secrets.randbelow(1_000_000_000)


@functools.cache
def _interpreter(other_uid: bool) -> str:
    """This interpreter, unless another uid cannot reach it (e.g. a pyenv under root's 0700 home): then the
    system's python3."""
    if not other_uid:
        return sys.executable
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if _world_readable(Path(sys.executable).resolve()) and _world_readable(lib.resolve()):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        exe = Path(candidate)
        if exe.exists() and _world_readable(exe.resolve()):
            return candidate
    return sys.executable


def _base_dir(other_uid: bool) -> str:
    """Where working directories go: the temp directory, unless the sandbox uid could not reach it (a
    TMPDIR inside a private home); then /tmp."""
    base = tempfile.gettempdir()
    if other_uid and not all(p.stat().st_mode & stat.S_IXOTH for p in (Path(base), *Path(base).parents)):
        return "/tmp"
    return base


def _world_readable(path: Path) -> bool:
    """Every directory above `path` lets others through and `path` lets others read it."""
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def _remove_tree(path: str) -> None:
    """Delete the working directory even where the code removed its own permissions."""

    def retry(func: Any, p: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p):
            os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=retry)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise UserError("usage: python -m megatron_rl.environments.sandbox FILE")
        path = Path(args[0])
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            code = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read it as UTF-8 text ({exc})") from exc
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(run_python(code).summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
