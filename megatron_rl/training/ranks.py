"""Start an SPMD world: `fn(rank, *args)` on every rank, returning each rank's result.

Locally (a laptop, one GPU node, CI) the ranks are child processes (`distributed.spawn`). Under a Ray
cluster (`RAY_ADDRESS` set, which is how the Slurm launcher runs the CLI on the head node) they are Ray
actors in one placement group, so a world spans every node Ray knows about. Either way rank 0's address
becomes MASTER_ADDR/PORT and the function sees the usual RANK/WORLD_SIZE/LOCAL_RANK environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from megatron_rl import distributed
from megatron_rl.rank_actors import RankActor, RankActors
from megatron_rl.ray_utils import gather, init_ray


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    gpus_per_rank: float = 0,
    cpus_per_rank: float = 1.0,
    timeout_s: float = float("inf"),
    log_name: str | None = None,
) -> list[Any]:
    """`log_name`: each rank's output goes to the run's `logs/<log_name>_rank<r>.log` (megatron_rl.console)."""
    if os.environ.get("RAY_ADDRESS"):
        return _ray_ranks(fn, world, args, gpus_per_rank, cpus_per_rank, timeout_s, log_name)
    return distributed.spawn(fn, world, *args, timeout_s=timeout_s, log_name=log_name)


class _FunctionRank(RankActor):
    """Runs `fn(rank, *args)` once the rank has joined the world."""

    def run(
        self,
        fn: Callable[..., Any],
        rank: int,
        world: int,
        master: tuple,
        args: tuple,
        threads: int,
        log_name: str | None = None,
    ) -> Any:
        import warnings

        import torch.distributed as dist

        from megatron_rl import console

        if log_name:
            console.redirect_to_log(f"{log_name}_rank{rank}")

        self.join(rank, world, *master, threads)
        warnings.filterwarnings("ignore", module=r"megatron\..*")
        try:
            return fn(rank, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _ray_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple,
    gpus: float,
    cpus: float,
    timeout_s: float,
    log_name: str | None = None,
) -> list[Any]:
    init_ray()
    timeout = None if timeout_s == float("inf") else timeout_s
    ranks = RankActors(_FunctionRank, world, gpus, cpus, timeout or 3600, "training ranks")
    try:
        refs = [
            a.run.remote(fn, r, world, ranks.master, args, ranks.threads, log_name)
            for r, a in enumerate(ranks.actors)
        ]
        return gather(refs, "training ranks", timeout)  # type: ignore[arg-type]
    finally:
        ranks.shutdown()
