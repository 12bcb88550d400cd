"""Megatron distributed checkpoints (torch_dist) of a policy: layout-independent, written atomically.

A checkpoint is written into `<dir>.tmp` and renamed into place by rank 0 after every rank finished,
so a crash mid-save leaves the previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

# The distributed optimizer's default format (fully_sharded_model_space) needs flattened ShardedTensors,
# which torch_dist no longer saves; "dp_reshardable" writes each rank's buffers as they are (fully parallel,
# reshardable across data-parallel sizes). Save and load must name the same format.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_state(policy: Any, model_sd: dict[str, Any], is_loading: bool) -> dict[str, Any]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
    if any(isinstance(o, DistributedOptimizer) for o in optimizers):
        return policy.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIMIZER_FORMAT
        )
    return policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)


def _materialize_optimizer_state(policy: Any) -> None:
    """A fresh torch Adam has no state until its first step, but loading needs the state tensors (and, on
    the torch-Adam path Megatron uses without Apex/TE, a 'step') to exist as targets."""
    import torch

    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _chunks(policy: Any) -> list[Any]:
    # DDP wrappers prefix keys with "module."; checkpoints hold the bare model's keys.
    from megatron.core.utils import unwrap_model

    return [unwrap_model(c) for c in policy.model]


def _model_sharded_state_dict(policy: Any) -> dict[str, Any]:
    chunks = _chunks(policy)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(policy: Any, directory: str | Path, with_optimizer: bool = True) -> Path:
    from megatron.core import dist_checkpointing

    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state: dict[str, Any] = {"model": _model_sharded_state_dict(policy)}
    if with_optimizer and policy.optimizer is not None:
        state["optimizer"] = _optimizer_state(policy, state["model"], is_loading=False)
        state["scheduler"] = policy.scheduler.state_dict()
    _in_process_write_results()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank == 0:
        old = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _in_process_write_results() -> None:
    """megatron-core's torch_dist writer collects its results through a queue it creates the first time, from a
    spawned `multiprocessing.Manager()`: one more Python process per rank (with a resource tracker) that only
    an orderly exit stops, so a killed run left both running under PID 1. A synchronous save reads the results
    back in the process that wrote them (the writer's forked children report through a queue of their own): an
    in-process queue serves it, and no process is started. Releases without that queue are left as they are."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def load_checkpoint(policy: Any, directory: str | Path, with_optimizer: bool = True) -> None:
    """Loads weights (and optimizer/scheduler when present and asked for) at the policy's own layout."""
    from megatron.core import dist_checkpointing

    from megatron_rl.errors import UserError

    path = Path(directory)
    if not (path / "metadata.json").is_file():
        raise UserError(f"{path} is not a Megatron distributed checkpoint (no metadata.json).")
    model_sd = _model_sharded_state_dict(policy)
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer and policy.optimizer is not None:
        _materialize_optimizer_state(policy)
        state["optimizer"] = _optimizer_state(policy, model_sd, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    chunks = _chunks(policy)
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded["model"][f"model{i}"])
    if with_optimizer and policy.optimizer is not None and "optimizer" in loaded:
        import torch

        with torch.no_grad():  # it copies into views of parameters that require grad
            policy.optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(policy, loaded["optimizer"])
        if "scheduler" in loaded:
            policy.scheduler.load_state_dict(loaded["scheduler"])


def _restore_adam_steps(policy: Any, loaded: Any) -> None:
    """megatron-core 0.16's DistributedOptimizer on the torch-Adam path (no TE/Apex) takes each parameter's
    'step' from the dp_reshardable param state, which holds the load-time template's value (0), and leaves
    every parameter sharing one step tensor: Adam's bias correction would restart after a resume and the
    shared counter would advance once per parameter. The saved step is in the param groups; give every
    parameter its own counter holding it. (Found by the SFT dp=2 exact-resume test.)"""
    import torch

    optimizers = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
    if len(optimizers) == 1:
        states = [loaded]
    else:
        states = [v for _, v in sorted(loaded.items())] if isinstance(loaded, dict) else list(loaded)
    for opt, sd in zip(optimizers, states):
        inner = getattr(opt, "optimizer", None)
        groups = sd.get("optimizer", {}).get("param_groups", []) if isinstance(sd, dict) else []
        steps = {float(g["step"]) for g in groups if g.get("step") is not None}
        if inner is None or len(steps) != 1:
            continue
        step = steps.pop()
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
