"""The Python tool's sandbox: hostile programs end with a clear error inside their limits, leave nothing
behind (no process, no working directory, no file outside it), and this process carries on."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from megatron_rl.environments.sandbox import SandboxLimits, _live_pids, arun_python, run_python

# Short limits keep the file fast; the defaults are what the CLI test exercises.
LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256, max_processes=8, max_output_bytes=4096)


@pytest.fixture(scope="module", autouse=True)
def children_before() -> set[int]:
    """This process's children before the module: a Ray cluster that an earlier test module started in the
    same pytest process stays up for the session and is not the sandbox's doing."""
    return {p.pid for p in psutil.Process().children()}


def _assert_cleaned_up(result) -> None:
    assert result.workdir and not os.path.exists(result.workdir), "the working directory must be deleted"
    uid = result.enforced.get("uid")
    if uid is not None:
        assert _live_pids(uid) == [], "every process of the run's uid must be gone"


def test_a_normal_program_returns_its_output():
    result = run_python("import json, math\nprint(json.dumps({'r': math.isqrt(1764)}))", LIMITS)
    assert result.ok and result.error is None and result.exit_code == 0 and not result.timed_out
    assert json.loads(result.stdout) == {"r": 42}
    _assert_cleaned_up(result)


def test_a_program_may_write_inside_its_directory():
    result = run_python("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())", LIMITS)
    assert result.ok and result.stdout == "kept\n"
    _assert_cleaned_up(result)


FAST_WALL = {"timeout_s": 1.0}
SLOW_WALL = {"timeout_s": 10.0}  # so that a loaded machine cannot turn a CPU-limit case into a timeout


@pytest.mark.parametrize(
    "name, code, limits, error, max_s",
    [
        ("infinite loop", "while True:\n    pass", SLOW_WALL, "CPU time limit exceeded (1 s)", 8.0),
        ("sleep past the deadline", "import time\ntime.sleep(60)", FAST_WALL, "timed out after 1 s", 2.0),
        ("memory bomb", "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", SLOW_WALL,
         "memory limit exceeded (256 MB)", 5.0),
        ("fork bomb", "import os\nwhile True:\n    os.fork()", SLOW_WALL, "process limit reached (8 processes)", 5.0),
        # One that swallows the refusals keeps forking until the wall clock ends it.
        ("stubborn fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
         FAST_WALL, "timed out after 1 s", 2.5),
        ("1 GB print", "import sys\nline = 'x' * 10**6\nfor _ in range(1000):\n    sys.stdout.write(line)",
         SLOW_WALL, "output limit exceeded: more than 4096 bytes", 5.0),
        ("big file", "open('big', 'wb').write(b'x' * (40 << 20))", SLOW_WALL, "file size limit exceeded", 5.0),
    ],
)
def test_hostile_programs_end_with_a_clear_error_within_the_limits(name, code, limits, error, max_s):
    start = time.monotonic()
    result = run_python(code, replace(LIMITS, **limits))
    elapsed = time.monotonic() - start
    assert not result.ok and result.error and error in result.error, (name, result.error, result.stderr[-300:])
    assert elapsed < max_s, f"{name}: {elapsed:.1f} s"
    assert len(result.stdout) <= LIMITS.max_output_bytes and len(result.stderr) <= LIMITS.max_output_bytes
    _assert_cleaned_up(result)


def test_writes_outside_the_directory_fail():
    target = Path("/tmp") / f"mrl-sandbox-escape-{uuid.uuid4().hex}"  # world-writable: only the sandbox stops it
    code = (
        f"import os\nfor path in ({str(target)!r}, '../escape.txt', os.path.expanduser('~/../x')):\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as e:\n        print('refused', type(e).__name__)\n"
    )
    result = run_python(code, LIMITS)
    assert result.ok and result.stdout.count("refused PermissionError") == 3, result.stdout
    assert not target.exists()
    assert not (Path(result.workdir).parent / "escape.txt").exists()
    _assert_cleaned_up(result)
    result = run_python(f"open({str(target)!r}, 'w')", LIMITS)
    assert not result.ok and "PermissionError" in result.error
    assert result.enforced["writes"] in ("landlock", "audit-hook")


def test_network_is_off_where_the_os_allows():
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", LIMITS)
    if not result.enforced.get("network"):
        pytest.skip(f"network isolation not available here: {result.enforced}")
    assert not result.ok and ("unreachable" in result.error or "PermissionError" in result.error), result.error


def test_the_environment_is_scrubbed():
    os.environ["MRL_SANDBOX_SECRET"] = "do-not-leak"
    try:
        result = run_python("import os\nprint(sorted(os.environ))", LIMITS)
    finally:
        del os.environ["MRL_SANDBOX_SECRET"]
    assert result.ok and "MRL_SANDBOX_SECRET" not in result.stdout
    assert set(ast.literal_eval(result.stdout)) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "LC_CTYPE"}


def test_this_process_carries_on_after_the_bombs(children_before):
    # After the parametrized bombs above: no stray children of ours, and a normal run still works.
    result = run_python("print(sum(range(10)))", LIMITS)
    assert result.ok and result.stdout == "45\n"
    # Every sandboxed program is a direct child (a new session); what it forked is in its subtree.
    stray = [p for p in psutil.Process().children() if p.pid not in children_before]
    assert stray == []


def test_async_runs_do_not_block_the_event_loop():
    async def main() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.monotonic()
        results = await asyncio.gather(*(arun_python("import time\ntime.sleep(0.6)\nprint('done')", LIMITS)
                                         for _ in range(4)))
        elapsed = time.monotonic() - start
        task.cancel()
        assert all(r.ok and r.stdout == "done\n" for r in results)
        return elapsed, ticks

    elapsed, ticks = asyncio.run(main())
    assert elapsed < 2.0, f"4 concurrent 0.6 s runs took {elapsed:.2f} s"  # serial would be >= 2.4 s
    assert ticks >= 5, "the event loop kept running while the programs ran"


def test_cli_prints_one_json_object(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("print('hi')\n")
    run = subprocess.run([sys.executable, "-m", "megatron_rl.environments.sandbox", str(script)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out == {"ok": True, "timed_out": False, "exit_code": 0, "stdout": "hi\n", "stderr": "", "error": None}


def test_cli_missing_file_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "megatron_rl.environments.sandbox", str(tmp_path / "nope.py")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "nope.py" in run.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to run as a user")
def test_an_unprivileged_trainer_gets_the_same_limits():
    # Not root: no uid to drop to, so the process limit counts from the user's own processes, and the
    # namespaces come from a user namespace. The trainer side runs as an ordinary uid here.
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # pytest's tmp_path is private to root
        _run_as_user(Path(folder))


def _run_as_user(tmp_path: Path) -> None:
    script = tmp_path / "as_user.py"
    script.write_text(
        f"import json, sys\nsys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "from megatron_rl.environments.sandbox import SandboxLimits, run_python\n"
        "limits = SandboxLimits(timeout_s=5, cpu_s=1, max_processes=8)\n"
        "runs = [run_python(c, limits) for c in ('print(6 * 7)', 'import os\\nwhile True:\\n    os.fork()',\n"
        "        \"open('/tmp/mrl-sandbox-user-escape', 'w')\")]\n"
        "print(json.dumps([[r.ok, r.error, r.stdout, r.enforced] for r in runs]))\n"
    )
    tmp_path.chmod(0o755)
    script.chmod(0o644)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    run = subprocess.run(["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups", python, str(script)],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0 and "Permission denied" in run.stderr:
        pytest.skip(f"the test user cannot read the checkout: {run.stderr[-200:]}")
    assert run.returncode == 0, run.stderr
    hello, bomb, escape = json.loads(run.stdout)
    assert hello[:3] == [True, None, "42\n"] and "uid" not in hello[3]
    assert not bomb[0] and "process limit reached" in bomb[1]
    assert not escape[0] and "PermissionError" in escape[1]
    assert not Path("/tmp/mrl-sandbox-user-escape").exists()
