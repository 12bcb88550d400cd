"""Building the GRPO run's parts from config: the policy ranks and the generation engine group."""

from __future__ import annotations

from typing import Any

from megatron_rl.config.schema import world_size
from megatron_rl.dtypes import hf_name
from megatron_rl.errors import UserError
from megatron_rl.generation.base import EngineSettings, RefitSettings
from megatron_rl.generation.client import EngineClient
from megatron_rl.generation.group import EngineGroup
from megatron_rl.grpo.policy_group import PolicyGroup
from megatron_rl.grpo.policy_worker import PolicySpec
from megatron_rl.parallel import ParallelConfig


def build_policy(cfg: Any, model_dir: str) -> PolicyGroup:
    from omegaconf import OmegaConf

    par = ParallelConfig(**OmegaConf.to_container(cfg.policy.parallel))
    spec = PolicySpec(
        hf_dir=model_dir,
        parallel=par,
        optim=cfg.policy.optim,
        dtype=cfg.model.dtype,
        seed=cfg.run.seed,
        micro_batch_tokens=cfg.policy.micro_batch_tokens,
        keep_reference=bool(cfg.grpo.kl_coef),
    )
    gpus = 1 if cfg.cluster.gpus_per_node else 0
    return PolicyGroup(spec, world_size(cfg), gpus_per_rank=gpus, cpus_per_rank=cfg.cluster.cpus_per_rank)


def derive_num_engines(cfg: Any) -> int:
    """`generation.num_engines`, or when 0/null what the layout gives: one on CPU; colocated on GPU, one per
    `generation.tp` policy GPUs; separate, one per `generation.tp` of the pool's `generation.gpus`."""
    g = cfg.generation
    if g.num_engines:
        return int(g.num_engines)
    if not cfg.cluster.gpus_per_node:
        return 1
    gpus = world_size(cfg) if g.colocated else g.gpus
    if gpus < g.tp:
        where = "the policy's GPUs" if g.colocated else "generation.gpus"
        raise UserError(
            f"generation.tp={g.tp} needs more GPUs than {where} ({gpus}): lower generation.tp"
            + ("" if g.colocated else " or raise generation.gpus")
            + ", or set generation.num_engines."
        )
    return gpus // g.tp


def build_engine(cfg: Any, model_dir: str) -> EngineGroup:
    g = cfg.generation
    settings = EngineSettings(
        tp=g.tp,
        max_model_len=g.max_model_len,
        gpu_memory_utilization=g.gpu_memory_utilization,
        enforce_eager=g.enforce_eager,
        dtype=hf_name(cfg.model.dtype),
        cpu_kv_cache_gb=g.cpu_kv_cache_gb,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.run.seed,
    )
    # Colocated on GPU: the engine shares the policy's devices (fractional GPU); separate: its own GPUs.
    gpus = (0.4 if g.colocated else g.tp) if cfg.cluster.gpus_per_node else 0
    refit = RefitSettings(transport=g.refit_transport, bucket_mb=g.refit_bucket_mb, timeout_s=g.timeout_s)

    def start_engine(index: int) -> EngineClient:
        return EngineClient(
            model_dir,
            settings,
            num_cpus=cfg.cluster.cpus_per_rank,
            num_gpus=gpus,
            timeout_s=g.timeout_s,
            refit=refit,
            log_name=f"engine{index}",
        )

    return EngineGroup(start_engine, derive_num_engines(cfg), g.max_failures, g.timeout_s)
