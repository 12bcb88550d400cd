"""One Megatron world as Ray actors: a placement group with one bundle per rank, one actor per bundle, and
rank 0's address where every rank meets for torch.distributed.

GRPO's policy group and SFT/DPO under a Ray cluster both start their ranks this way; only what an actor
does once it has joined differs (a subclass of RankActor).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from megatron_rl.ray_utils import gather, remote_class


class RankActor:
    """Base of an actor class that holds one rank of the world."""

    def address(self) -> tuple[str, int]:
        """Where the world meets, asked of rank 0: its node's address and a port free there."""
        import ray

        from megatron_rl.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    @staticmethod
    def join(rank: int, world: int, addr: str, port: int, threads: int) -> None:
        """The environment torch.distributed reads, and this rank's share of the CPU threads."""
        import torch

        # Ray pins each actor to its own GPU (CUDA_VISIBLE_DEVICES), so the local device index is 0.
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port)
        )
        torch.set_num_threads(max(1, threads))


class RankActors:
    """`world` actors of `actor_cls` (a RankActor), actor r in bundle r; `master` is rank 0's address."""

    def __init__(
        self,
        actor_cls: type,
        world: int,
        gpus_per_rank: float,
        cpus_per_rank: float,
        timeout_s: float,
        what: str = "ranks",
        args: Callable[[int], tuple] = lambda rank: (),
    ) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        self.pg: Any = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        self.actors: list[Any] = []
        try:
            gather([self.pg.ready()], f"placing {what}", timeout_s)
            cls = remote_class(actor_cls)
            self.actors = [
                cls.options(
                    num_cpus=cpus_per_rank,
                    num_gpus=gpus_per_rank,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=r
                    ),
                ).remote(*args(r))
                for r in range(world)
            ]
            self.master: tuple[str, int] = tuple(
                gather([self.actors[0].address.remote()], f"{what}: rank 0 address", timeout_s)[0]
            )
        except BaseException:
            self.shutdown()
            raise
        # A GPU rank's CPU work is light: whole cores only. A CPU rank uses its share, rounded.
        self.threads = max(1, int(cpus_per_rank) if gpus_per_rank else int(round(cpus_per_rank)))

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
