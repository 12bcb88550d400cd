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


def placed_on() -> dict[str, Any]:
    """The calling actor's node id and Ray's GPU ids for it (no CUDA call)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "gpus": [int(g) for g in ray.get_gpu_ids()]}


class RankActor:
    """Base of an actor class that holds one rank of the world."""

    def where(self) -> dict[str, Any]:
        """Where Ray put this actor: its node and the GPUs it was given (cheap: touches no device)."""
        return placed_on()

    def address(self) -> tuple[str, int]:
        """Where the world meets, asked of rank 0: its node's address and the port of the rendezvous store
        it opens there now (and hands to torch.distributed when it joins)."""
        import ray

        from megatron_rl.distributed import host_rendezvous

        host = ray.util.get_node_ip_address()
        return host, host_rendezvous(host)

    @staticmethod
    def join(rank: int, world: int, addr: str, port: int, threads: int) -> None:
        """The environment torch.distributed reads, and this rank's share of the CPU threads."""
        import torch

        from megatron_rl.distributed import HOSTED_STORE_ENV

        # Ray pins each actor to its own GPU (CUDA_VISIBLE_DEVICES), so the local device index is 0.
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port)
        )
        os.environ[HOSTED_STORE_ENV] = "1"  # rank 0 opened it in `address`
        torch.set_num_threads(max(1, threads))


def reserve(bundles: list[dict[str, float]]) -> Any:
    """The world's placement group (one bundle per rank, all alike), packed onto as few nodes as hold them."""
    from ray.util.placement_group import placement_group

    return placement_group(bundles, strategy="PACK")


def bundle_of_rank(group: Any) -> list[int]:
    """Which bundle each rank takes, once the group is reserved: node by node, so that consecutive ranks
    (a tensor-parallel group) share a node. Ray's PACK strategy fills nodes but scatters bundle indices
    over them."""
    import ray

    nodes = ray.util.placement_group_table(group)["bundles_to_node_id"]
    first: dict[str, int] = {}
    for b in sorted(nodes):
        first.setdefault(nodes[b], b)
    return sorted(nodes, key=lambda b: (first[nodes[b]], b))


def host_names() -> dict[str, str]:
    """Ray node id -> its host name."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerHostname") or n["NodeManagerAddress"] for n in ray.nodes()}


def rank_actor_options(group: Any, bundle: int, cpus: float, gpus: float) -> dict[str, Any]:
    """A rank's Ray options: its share of `bundle` of the placement group (`launch plan --placement` places
    the ranks with these very options)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    return {"num_cpus": cpus, "num_gpus": gpus, "scheduling_strategy": strategy}


class RankActors:
    """`world` actors of `actor_cls` (a RankActor), actor r in bundle `bundle_of_rank[r]` of placement group
    `pg`; `master` is rank 0's address. `bundles` (default: each rank's own CPUs and GPUs; all alike) may
    reserve more than the ranks take, for the colocated engines that share their GPUs
    (megatron_rl.placement)."""

    def __init__(
        self,
        actor_cls: type,
        world: int,
        gpus_per_rank: float,
        cpus_per_rank: float,
        timeout_s: float,
        what: str = "ranks",
        args: Callable[[int], tuple] = lambda rank: (),
        bundles: list[dict[str, float]] | None = None,
    ) -> None:
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        self.pg: Any = reserve(bundles or [dict(bundle) for _ in range(world)])
        self.actors: list[Any] = []
        try:
            gather([self.pg.ready()], f"placing {what}", timeout_s)
            self.bundle_of_rank = bundle_of_rank(self.pg)
            cls = remote_class(actor_cls)
            self.actors = [
                cls.options(
                    **rank_actor_options(self.pg, self.bundle_of_rank[r], cpus_per_rank, gpus_per_rank)
                ).remote(*args(r))
                for r in range(world)
            ]
            self.master: tuple[str, int] = tuple(
                gather([self.actors[0].address.remote()], f"{what}: rank 0 address", timeout_s)[0]
            )
            placed = gather([a.where.remote() for a in self.actors], f"{what}: where they run", timeout_s)
            # Where each rank runs, for errors and hang reports that name a rank's node.
            self.node_ids: list[str] = [p["node_id"] for p in placed]
            self.hosts: list[str] = [host_names().get(n, n[:12]) for n in self.node_ids]
        except BaseException:
            self.shutdown()
            raise
        # A GPU rank's CPU work is light: whole cores only. A CPU rank uses its share, rounded.
        self.threads = max(1, int(cpus_per_rank) if gpus_per_rank else int(round(cpus_per_rank)))

    def unresponsive(self, timeout_s: float = 10.0) -> dict[int, str]:
        """Ranks whose actor died ("died") or does not answer within `timeout_s` ("no answer": busy in a call
        that does not return); the others are healthy."""
        import ray
        from ray.exceptions import RayActorError

        refs = {a.where.remote(): r for r, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        out = {r: "no answer" for ref, r in refs.items() if ref not in ready}
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                out[refs[ref]] = "died"
        return out

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
