"""What the console shows: quiet by default, every process's full output in log files, `--verbose` shows all.

Quiet (the default): the console carries the progress bar, the final figures, where the logs are, warnings
that mean something and errors. Each worker process (the vLLM engine actor, a policy rank actor, an SFT/DPO
rank, the warm start) sends its stdout and stderr to `<run>/logs/<name>.log` at the file-descriptor level,
so C/C++ output (vLLM, torch, gloo) is caught too; Ray's forwarding of actor output to the driver is off.
Verbose (`--verbose`, or MEGATRON_RL_VERBOSE=1): nothing is redirected or silenced.

The policy travels by environment, so it holds in every child: MEGATRON_RL_VERBOSE, and MEGATRON_RL_LOG_DIR
(set only when quiet, once a run directory exists). Spawned processes inherit both; Ray actors get them
through their runtime env (`actor_env`), which also reaches actors on other nodes and a Ray cluster that was
started before this run.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

VERBOSE_ENV = "MEGATRON_RL_VERBOSE"
LOG_DIR_ENV = "MEGATRON_RL_LOG_DIR"
LOGS = "logs"  # the folder of a run directory that holds the worker logs
_HEADER = "#### megatron-rl worker log"

# Import-time warnings about intended fallbacks on a machine without Transformer Engine or apex.
_EXPECTED_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
)

_state: dict[str, Any] = {"terminal_fd": None, "announced": set()}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose_flag: bool = False) -> None:
    """Called once by the CLI before anything heavy is imported: `--verbose` turns verbose on for this process
    and its children; otherwise the controller's own known chatter is silenced."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if not verbose():
        quiet_controller()


def quiet_controller() -> None:
    """Silences what the controller process would print without meaning anything to the user: expected
    fallback warnings, Hugging Face progress bars, wandb's banner and run summary (Ray's startup line:
    `ray_logging_level`, which init_ray applies)."""
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # Read when these libraries are imported; a user's own setting wins.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # imported already: the variable above came too late
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def ray_logging_level() -> int:
    """The level of Ray's own driver-side logger ("Started a local Ray instance." is INFO)."""
    import logging

    return logging.INFO if verbose() else logging.WARNING


def log_dir() -> Path | None:
    """Where worker processes write their output, or None: verbose, or no run directory yet."""
    value = os.environ.get(LOG_DIR_ENV)
    return Path(value) if value and not verbose() else None


def logs_of(run_path: str | Path) -> Path:
    """The logs folder of a run directory."""
    return Path(run_path) / LOGS


def use_run_dir(run_path: str | Path) -> Path | None:
    """Called by a command's controller once its run directory exists: workers started from now on write to
    `<run>/logs/`, and the console says so once. Returns the logs folder (None when verbose)."""
    if verbose():
        os.environ.pop(LOG_DIR_ENV, None)
        return None
    folder = logs_of(run_path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_DIR_ENV] = str(folder)
    line = logs_line(run_path)
    if line and str(folder) not in _state["announced"]:
        _state["announced"].add(str(folder))
        print(line, flush=True)
    return folder


def logs_line(run_path: str | Path) -> str | None:
    """The one line that tells the user where a run's logs are (None when verbose: everything is on the
    console then). A parent that only follows a run (the NeMo-Run launcher) prints this itself."""
    if verbose():
        return None
    return f"logs: {logs_of(run_path).resolve()}/ (each worker's output; --verbose shows it on the console)"


def actor_env() -> dict[str, str]:
    """Environment for a Ray actor's runtime env: the console policy, when there is one to carry."""
    return {k: os.environ[k] for k in (VERBOSE_ENV, LOG_DIR_ENV) if os.environ.get(k)}


def redirect_to_log(name: str) -> Path | None:
    """In a worker process: sends fd 1 and fd 2 to `<log dir>/<name>.log` (appended, so a resumed run keeps
    the earlier attempts' output). A no-op when verbose or when no run directory is set. The original stdout
    stays reachable through `terminal()`. Also where the worker's stacks go on request (faults.stacks)."""
    from megatron_rl.faults import stacks

    stacks.install()
    folder = log_dir()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.log"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if _state["terminal_fd"] is None:
        _state["terminal_fd"] = os.dup(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        try:  # a log read while the run goes should be current
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    print(f"{_HEADER}: {name} pid={os.getpid()} actor={_actor_id()} at {time.strftime('%F %T')}", flush=True)
    return path


def _actor_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_actor_id() or "-"
    except Exception:  # noqa: BLE001 - the header is a convenience
        pass
    return "-"


def terminal() -> Any:
    """A rich Console on this process's original stdout, even after `redirect_to_log` (rank 0 of an SFT/DPO
    world draws the progress bar there); None means the default console."""
    if _state["terminal_fd"] is None:
        return None
    from rich.console import Console

    return Console(file=os.fdopen(os.dup(_state["terminal_fd"]), "w", buffering=1))


def find_log(pid: int | None = None, actor_id: str | None = None) -> Path | None:
    """The log file of the worker with this pid or Ray actor id, from the header each redirect writes."""
    folder = log_dir()
    if folder is None or not folder.is_dir() or (pid is None and not actor_id):
        return None
    wanted = []
    if pid is not None:
        wanted.append(f" pid={pid} ")
    if actor_id:
        wanted.append(f" actor={actor_id} ")
    for path in sorted(folder.glob("*.log")):
        with path.open(errors="replace") as f:
            if any(line.startswith(_HEADER) and any(w in line for w in wanted) for line in f):
                return path
    return None


def log_hint(path: Path | None, tail_lines: int = 0) -> str:
    """Text to append to an error about a worker: its log file, and optionally the log's last lines (for a
    process that died without an exception, the cause is only there)."""
    if path is None:
        folder = log_dir()
        return f"; worker logs: {folder}/" if folder is not None else ""
    hint = f"; its log: {path}"
    if tail_lines and path.is_file():
        lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
        hint += "; its last lines:\n" + "\n".join(f"  {ln}" for ln in lines)
    return hint
