"""Ray helpers: start/stop a local cluster, and wait on actor calls with a deadline and clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from megatron_rl import console
from megatron_rl.errors import UserError


class WorkerError(RuntimeError):
    """A Ray worker died or raised; the message names the phase and the cause."""


# The console settings (megatron_rl.console) the local cluster's workers inherited when this process started
# it; None: a cluster started elsewhere, whose workers must be told through their runtime env.
_inherited_console_env: dict[str, str] | None = None


def init_ray(num_cpus: int | None = None, log_to_driver: bool | None = None) -> None:
    """`log_to_driver` (actors' output on this console) defaults to: verbose, or no run logs to hold it."""
    import ray

    global _inherited_console_env
    if ray.is_initialized():
        return
    if log_to_driver is None:
        log_to_driver = console.log_dir() is None
    # Ray would otherwise write an auth token under $HOME; the local cluster is loopback-only.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    common = dict(
        include_dashboard=False, log_to_driver=log_to_driver, logging_level=console.ray_logging_level()
    )
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **common)
        _inherited_console_env = None
    else:
        # address="local": a new cluster of our own, never one a `ray start` left on this machine (Ray would
        # otherwise join it through /tmp/ray/ray_current_cluster).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **common)
        _inherited_console_env = console.actor_env()


def actor_env() -> dict[str, str]:
    """The console settings an actor's runtime env must carry (none when its worker inherits them already:
    a runtime env costs each actor a fresh worker process)."""
    env = console.actor_env()
    return {} if env == _inherited_console_env else env


def remote_class(cls: type) -> Any:
    import ray

    env = actor_env()
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    return ray.remote(max_restarts=0, max_task_retries=0, **options)(cls)


def gather(refs: list[Any], phase: str, timeout_s: float) -> list[Any]:
    """ray.get with a deadline: a dead actor or an exception becomes a WorkerError naming the phase."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as exc:
        raise WorkerError(f"{phase}: no answer from the workers within {timeout_s:.0f} s") from exc
    except RayActorError as exc:
        _settle(refs)
        # Its output (a C++ abort, an OOM kill notice) is only in its log: the end of it comes along.
        hint = console.log_hint(_worker_log(exc), tail_lines=15)
        raise WorkerError(f"{phase}: a worker process died ({exc.__class__.__name__}: {exc}){hint}") from exc
    except RayTaskError as exc:
        _settle(refs)
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, UserError):
            raise cause from None
        hint = console.log_hint(_worker_log(exc))
        raise WorkerError(f"{phase}: a worker raised {type(cause).__name__}: {cause}{hint}") from exc


def _settle(refs: list[Any], wait_s: float = 1.0) -> None:
    """Reads the other calls' results after one failed: their errors (peers of a dead rank fail too) are then
    handled, not printed by Ray as "Unhandled error" tracebacks when the refs are dropped."""
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass


def _worker_log(exc: Exception) -> Path | None:
    """The failed worker's log file (megatron_rl.console): Ray's error names the worker's pid or actor id."""
    text = str(exc)
    pid = re.search(r"\(pid=(\d+)", text)
    actor = re.search(r"actor_id[=:]\s*([0-9a-f]+)", text)
    return console.find_log(
        pid=int(pid.group(1)) if pid else None,
        actor_id=actor.group(1) if actor else getattr(exc, "actor_id", None),
    )
