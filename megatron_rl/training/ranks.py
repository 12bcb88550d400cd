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


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    gpus_per_rank: float = 0,
    cpus_per_rank: float = 1.0,
    timeout_s: float = float("inf"),
) -> list[Any]:
    if os.environ.get("RAY_ADDRESS"):
        return _ray_ranks(fn, world, args, gpus_per_rank, cpus_per_rank, timeout_s)
    return distributed.spawn(fn, world, *args, timeout_s=timeout_s)


class _RankActor:
    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), distributed.free_port()

    def run(
        self, fn: Callable[..., Any], rank: int, world: int, addr: str, port: int, args: tuple, threads: int
    ) -> Any:
        import warnings

        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)

        # Ray pins each actor to its own GPU (CUDA_VISIBLE_DEVICES), so the local device index is 0.
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port)
        )
        warnings.filterwarnings("ignore", module=r"megatron\..*")
        try:
            return fn(rank, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _ray_ranks(
    fn: Callable[..., Any], world: int, args: tuple, gpus: float, cpus: float, timeout_s: float
) -> list[Any]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from megatron_rl.grpo.ray_utils import gather, init_ray, remote_class

    init_ray()
    timeout = None if timeout_s == float("inf") else timeout_s
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    actors = []
    try:
        gather([pg.ready()], "placing ranks", timeout or 3600)
        cls = remote_class(_RankActor)
        actors = [
            cls.options(
                num_cpus=cpus,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote()
            for r in range(world)
        ]
        addr, port = gather([actors[0].address.remote()], "rank 0 address", timeout or 600)[0]
        threads = max(1, int(round(cpus)))
        refs = [a.run.remote(fn, r, world, addr, port, args, threads) for r, a in enumerate(actors)]
        return gather(refs, "training ranks", timeout)  # type: ignore[arg-type]
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
