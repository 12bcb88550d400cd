"""One Megatron world as Ray actors (the launcher GRPO's policy and SFT/DPO on a Ray cluster share): every
rank joins at rank 0's address, whose port rank 0 holds from the moment it gives it (nothing can take it
before the world forms), and nothing is left behind, also when a rank fails to start."""

from __future__ import annotations

import os
import socket

import pytest

from megatron_rl.rank_actors import RankActor, RankActors
from megatron_rl.ray_utils import WorkerError, gather


class _Probe(RankActor):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def joined(self, world: int, master: tuple[str, int], threads: int) -> dict[str, str]:
        self.join(self.rank, world, *master, threads)
        return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}

    def all_reduce(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        from megatron_rl import distributed
        from megatron_rl.parallel import ParallelConfig

        distributed.initialize(ParallelConfig(), seed=0, timeout_s=60)
        total = torch.tensor([value])
        dist.all_reduce(total)
        distributed.teardown()
        return float(total)


class _Broken(RankActor):
    def __init__(self) -> None:
        raise RuntimeError("no device here")


def _groups_alive(ray) -> int:
    return sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())


def test_ranks_join_rank_zeros_address_and_shutdown_frees_the_placement(ray_cluster):
    before = _groups_alive(ray_cluster)
    ranks = RankActors(_Probe, 2, 0, 0.5, timeout_s=120, what="probe ranks", args=lambda r: (r,))
    try:
        assert _groups_alive(ray_cluster) == before + 1
        addr, port = ranks.master
        assert isinstance(port, int) and port > 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("", port))  # rank 0's rendezvous store listens there already
        envs = gather([a.joined.remote(2, ranks.master, ranks.threads) for a in ranks.actors], "probe", 60)
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {(e["WORLD_SIZE"], e["LOCAL_RANK"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {
            ("2", "0", addr, str(port))
        }
        assert ranks.threads == 1  # half a CPU each, rounded up to one thread
        sums = gather([a.all_reduce.remote(r + 1.0) for r, a in enumerate(ranks.actors)], "all_reduce", 120)
        assert sums == [3.0, 3.0]  # the world formed at that store
    finally:
        ranks.shutdown()
    assert _groups_alive(ray_cluster) == before and ranks.actors == []


def test_a_rank_that_cannot_start_is_a_worker_error_and_leaves_nothing(ray_cluster):
    before = _groups_alive(ray_cluster)
    with pytest.raises(WorkerError, match="broken ranks: rank 0 address: a worker"):
        RankActors(_Broken, 2, 0, 0.5, timeout_s=120, what="broken ranks")
    assert _groups_alive(ray_cluster) == before
