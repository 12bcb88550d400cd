"""One Megatron rank as a Ray actor, and the group of them that the controller drives as one policy.

Every rank of a data-parallel group receives the same shard of sequences and packs it the same way, so
tensor/pipeline peers see identical micro-batches. Results come back from the last pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_rl.dtypes import precision
from megatron_rl.faults.inject import fault_point
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.optim import OptimConfig
from megatron_rl.rank_actors import RankActor


@dataclass
class PolicySpec:
    hf_dir: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: Any = field(default_factory=OptimConfig)
    dtype: str = "fp32"
    seed: int = 1234
    micro_batch_tokens: int = 4096
    keep_reference: bool = False
    router_replay: str = "off"  # MoE: off | measure | engine (policy/router_replay.py)
    collective_timeout_s: float = 600.0  # torch.distributed's, from run.watchdog (megatron_rl.faults.watchdog)


LOG_NAME = "policy_rank"  # rank r writes <run>/logs/policy_rank<r>.log


def micro_batches(seqs: list[dict[str, Any]], token_budget: int) -> list[dict[str, torch.Tensor]]:
    from megatron_rl.data.collate import collate_sequences
    from megatron_rl.data.packing import pack_by_token_budget
    from megatron_rl.policy.router_replay import collate_routing

    groups = pack_by_token_budget([len(s["ids"]) for s in seqs], token_budget)
    mbs = [dict(collate_sequences([seqs[i] for i in g]), index=torch.tensor(g)) for g in groups]
    for mb, g in zip(mbs, groups):
        # the engine's routed experts, in the same rows and token order as input_ids
        if (routing := collate_routing([seqs[i] for i in g])) is not None:
            mb["routing"] = routing
    return mbs


class PolicyWorker(RankActor):
    """Lives in a Ray actor; owns one Megatron rank."""

    def __init__(self, rank: int, world_size: int, spec: PolicySpec) -> None:
        import warnings

        from megatron_rl import console

        console.redirect_to_log(f"{LOG_NAME}{rank}")  # first: everything it prints goes to <run>/logs/
        # Megatron warns at import about missing TE/apex and deprecated args; the fallbacks are intended.
        warnings.filterwarnings("ignore", module=r"megatron\..*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.policy: Any = None
        self.reference: dict[str, torch.Tensor] | None = None

    def setup(self, master_addr: str, master_port: int, threads: int) -> dict[str, Any]:
        from megatron_rl import distributed
        from megatron_rl.models.hf_config import load_hf_config
        from megatron_rl.policy.core import MegatronPolicy

        self.join(self.rank, self.world_size, master_addr, master_port, threads)
        distributed.initialize(
            self.spec.parallel, seed=self.spec.seed, timeout_s=round(self.spec.collective_timeout_s)
        )
        self.policy = MegatronPolicy(
            load_hf_config(self.spec.hf_dir),
            self.spec.parallel,
            self.spec.optim,
            precision(self.spec.dtype),
            router_replay=self.spec.router_replay,
        )
        self.policy.load_hf(self.spec.hf_dir)
        if self.spec.keep_reference:
            # The frozen reference lives in host memory and is swapped in only for its forward pass.
            self.reference = {n: p.detach().to("cpu", copy=True) for n, p in self.policy.named_parameters()}
        from megatron.core import parallel_state

        return {"rank": self.rank, "dp_rank": parallel_state.get_data_parallel_rank()}

    def _swap(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        previous = {}
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                previous[name] = p.detach().to("cpu", copy=True)
                p.copy_(weights[name])
        return previous

    def logprobs(self, seqs: list[dict[str, Any]], reference: bool = False) -> list[torch.Tensor] | None:
        """Per-sequence token logprobs [len-1] on output ranks (tp rank 0 of the last stage), else None."""
        from megatron.core import parallel_state

        fault_point("logprobs", self.rank)
        mbs = micro_batches(seqs, self.spec.micro_batch_tokens)
        saved = self._swap(self.reference) if reference else None
        try:
            per_mb = self.policy.logprobs(mbs)
        finally:
            if saved is not None:
                self._swap(saved)
        if not reference and self.policy.replay is not None:
            self.routing_counts = (self.policy.replay.agree, self.policy.replay.total)
        if per_mb is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for mb, lp in zip(mbs, per_mb):
            for row, i in enumerate(mb["index"].tolist()):
                out[i] = lp[row, : len(seqs[i]["ids"]) - 1].clone()
        return out  # type: ignore[return-value]

    def router_agreement_counts(self) -> tuple[int, int]:
        """(token-layer routing decisions where this rank's routers chose the engine's experts, decisions
        counted) in the last policy logprob forward; the group sums them over ranks."""
        return getattr(self, "routing_counts", (0, 0))

    def train(
        self, seqs: list[dict[str, Any]], loss_name: str, loss_kwargs: dict[str, Any]
    ) -> dict[str, float]:
        from megatron_rl.algorithms.registry import get_policy_loss

        fault_point("train", self.rank)
        loss = get_policy_loss(loss_name)
        mbs = micro_batches(seqs, self.spec.micro_batch_tokens)

        def loss_fn(logprobs: torch.Tensor, mb: dict[str, torch.Tensor]):
            return loss(logprobs, mb, **loss_kwargs)

        from megatron_rl import platform

        metrics = self.policy.train_step(mbs, loss_fn)
        metrics["memory/peak_gb"] = platform.peak_memory_gb()
        return metrics

    def save(self, directory: str) -> None:
        from megatron_rl.policy.checkpoint import save_checkpoint

        with self.policy.resident():
            save_checkpoint(self.policy, directory)

    def load(self, directory: str) -> None:
        from megatron_rl.policy.checkpoint import load_checkpoint

        with self.policy.resident():
            load_checkpoint(self.policy, directory)

    def offload(self, what: str) -> dict[str, float]:
        """Frees the optimizer state (and grad buffers) around generation (policy/offload.py)."""
        return {"bytes": float(self.policy.offload(what))}

    def onload(self) -> dict[str, float]:
        return {"bytes": float(self.policy.onload())}

    def write_hf_buckets(self, directory: str, bucket_mb: int) -> tuple[list[str], int]:
        """Every rank joins the gather; rank 0 writes safetensors buckets of ~bucket_mb and lists them."""
        from pathlib import Path

        from checkpoint_converters import export_hf_weights
        from checkpoint_converters.hf_io import ShardedWriter

        writer = ShardedWriter(Path(directory), shard_bytes=bucket_mb * 1024 * 1024)
        for name, tensor in export_hf_weights(self.policy.model):
            writer.add(name, tensor)
        if self.rank != 0:
            return [], 0
        writer.close()
        return [str(f) for f in writer.files], writer.total

    def push_hf_weights(self, engine: Any, version: int) -> dict[str, Any] | None:
        """Every rank joins the gather; rank 0 streams the HF tensors into the engine bucket by bucket through
        the engine's configured transport (shared memory, CUDA IPC or a broadcast group). With pipeline
        parallelism each stage's sender streams its own stage's tensors instead (generation/stages.py)."""
        from megatron.core import parallel_state

        from checkpoint_converters import export_hf_weights
        from megatron_rl.generation.client import stream_from_policy_rank

        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return stream_from_policy_rank(engine, export_hf_weights(self.policy.model), self.rank, version)
        from checkpoint_converters.live import stage_senders
        from megatron_rl.generation.stages import stream_from_stages

        stages = stage_senders()
        weights = export_hf_weights(self.policy.model, stages=stages)
        engines = engine if isinstance(engine, list) else [engine]
        return stream_from_stages(engines, weights, stages, version)

    def hf_weights(self) -> list[tuple[str, torch.Tensor]] | None:
        """All weights in HF names and layout (gathered over TP/EP/PP); returned by rank 0 only."""
        from checkpoint_converters import export_hf_weights

        items = list(export_hf_weights(self.policy.model))
        return items if self.rank == 0 else None
