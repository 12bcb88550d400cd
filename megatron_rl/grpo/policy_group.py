"""The policy as the controller sees it: Ray actors in a placement group forming one Megatron world."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_rl import console
from megatron_rl.grpo.policy_worker import LOG_NAME, PolicySpec, PolicyWorker
from megatron_rl.rank_actors import RankActors
from megatron_rl.ray_utils import gather


class PolicyGroup:
    def __init__(
        self,
        spec: PolicySpec,
        world_size: int,
        gpus_per_rank: float,
        cpus_per_rank: float,
        timeout_s: float = 1800,
        bundles: list[dict[str, float]] | None = None,
    ) -> None:
        self.spec, self.world_size, self.timeout_s = spec, world_size, timeout_s
        self.dp = spec.parallel.check_world(world_size)
        self.ranks = RankActors(
            PolicyWorker,
            world_size,
            gpus_per_rank,
            cpus_per_rank,
            timeout_s,
            "policy ranks",
            lambda r: (r, world_size, spec),
            bundles,
        )
        self.workers = self.ranks.actors
        try:
            setup = [w.setup.remote(*self.ranks.master, self.ranks.threads) for w in self.workers]
            info = gather(setup, "policy setup", timeout_s)
        except BaseException:
            self.ranks.shutdown()
            raise
        # Every rank of a DP group (its TP/PP/CP peers) must see the same shard; Megatron says which.
        self.dp_rank = [i["dp_rank"] for i in info]

    @property
    def placement_group(self) -> Any:
        """The ranks' placement group: colocated engines live in its bundles (megatron_rl.placement)."""
        return self.ranks.pg

    @property
    def bundle_of_rank(self) -> list[int]:
        """Rank r's bundle in that group (Ray numbers bundles in no node order)."""
        return self.ranks.bundle_of_rank

    def log_file(self, rank: int) -> Path | None:
        """Rank `rank`'s log (<run>/logs/policy_rank<r>.log), None when verbose (its output is on the console)."""
        folder = console.log_dir()
        return folder / f"{LOG_NAME}{rank}.log" if folder is not None else None

    def _dp_rank_of(self, rank: int) -> int:
        return self.dp_rank[rank]

    def _shards(self, seqs: list[dict[str, Any]]) -> list[list[int]]:
        """Balances sequences over DP ranks by tokens (longest first to the lightest shard)."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]["ids"]))
        shards: list[list[int]] = [[] for _ in range(self.dp)]
        loads = [0] * self.dp
        for i in order:
            d = loads.index(min(loads))
            shards[d].append(i)
            loads[d] += len(seqs[i]["ids"])
        if any(not s for s in shards):
            raise ValueError(f"{len(seqs)} sequences cannot fill {self.dp} data-parallel ranks")
        return [sorted(s) for s in shards]

    def logprobs(self, seqs: list[dict[str, Any]], reference: bool = False) -> list[torch.Tensor]:
        shards = self._shards(seqs)
        refs = [
            w.logprobs.remote([seqs[i] for i in shards[self._dp_rank_of(r)]], reference)
            for r, w in enumerate(self.workers)
        ]
        results = gather(refs, "logprobs", self.timeout_s)
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for r, res in enumerate(results):
            if res is not None:
                for i, lp in zip(shards[self._dp_rank_of(r)], res):
                    out[i] = lp
        return out  # type: ignore[return-value]

    def router_agreement(self) -> float | None:
        """The fraction of token-layer routing decisions where the trainer's routers chose the engine's
        experts in the last logprob forward (before any replay), over all ranks; None when none was counted
        (a dense model, or no engine routing)."""
        counts = gather([w.router_agreement_counts.remote() for w in self.workers], "router agreement", 60)
        agree, total = (sum(c[i] for c in counts) for i in (0, 1))
        return agree / total if total else None

    def train(
        self, seqs: list[dict[str, Any]], loss_name: str, loss_kwargs: dict[str, Any]
    ) -> dict[str, float]:
        shards = self._shards(seqs)
        refs = [
            w.train.remote([seqs[i] for i in shards[self._dp_rank_of(r)]], loss_name, loss_kwargs)
            for r, w in enumerate(self.workers)
        ]
        return gather(refs, "train step", self.timeout_s)[0]

    def save(self, directory: str) -> None:
        gather([w.save.remote(directory) for w in self.workers], "checkpoint save", self.timeout_s)

    def load(self, directory: str) -> None:
        gather([w.load.remote(directory) for w in self.workers], "checkpoint load", self.timeout_s)

    def offload(self, what: str) -> float:
        """Every rank frees its optimizer state (and grad buffers, by `what`) until `onload` or the next
        train step; returns the bytes freed on the fullest rank."""
        got = gather([w.offload.remote(what) for w in self.workers], "offload", self.timeout_s)
        return max(g["bytes"] for g in got)

    def onload(self) -> float:
        got = gather([w.onload.remote() for w in self.workers], "onload", self.timeout_s)
        return max(g["bytes"] for g in got)

    def hf_weights(self) -> list[tuple[str, torch.Tensor]]:
        return gather([w.hf_weights.remote() for w in self.workers], "weight export", self.timeout_s)[0]

    def write_hf_buckets(self, directory: str, bucket_mb: int) -> tuple[list[str], int]:
        refs = [w.write_hf_buckets.remote(directory, bucket_mb) for w in self.workers]
        return gather(refs, "weight export", self.timeout_s)[0]

    def push_hf_weights(self, engine: Any, version: int) -> dict[str, Any]:
        refs = [w.push_hf_weights.remote(engine, version) for w in self.workers]
        return gather(refs, "weight export and refit", self.timeout_s)[0]

    def shutdown(self) -> None:
        self.ranks.shutdown()
