"""Ray helpers: start/stop a local cluster, and wait on actor calls with a deadline and clear errors."""

from __future__ import annotations

import os
from typing import Any

from megatron_rl.errors import UserError


class WorkerError(RuntimeError):
    """A Ray worker died or raised; the message names the phase and the cause."""


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray would otherwise write an auth token under $HOME; the local cluster is loopback-only.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=log_to_driver)


def remote_class(cls: type) -> Any:
    import ray

    return ray.remote(max_restarts=0, max_task_retries=0)(cls)


def gather(refs: list[Any], phase: str, timeout_s: float) -> list[Any]:
    """ray.get with a deadline: a dead actor or an exception becomes a WorkerError naming the phase."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as exc:
        raise WorkerError(f"{phase}: no answer from the workers within {timeout_s:.0f} s") from exc
    except RayActorError as exc:
        raise WorkerError(f"{phase}: a worker process died ({exc.__class__.__name__}: {exc})") from exc
    except RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, UserError):
            raise cause from None
        raise WorkerError(f"{phase}: a worker raised {type(cause).__name__}: {cause}") from exc
