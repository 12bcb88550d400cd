"""Building the GRPO run's parts from config: the policy ranks and the generation engine group."""

from __future__ import annotations

from typing import Any

from megatron_rl import colocation, placement
from megatron_rl.config.schema import world_size
from megatron_rl.dtypes import hf_name
from megatron_rl.faults.watchdog import collective_timeout_s
from megatron_rl.generation.base import EngineSettings, RefitSettings
from megatron_rl.generation.client import EngineClient
from megatron_rl.generation.group import EngineGroup
from megatron_rl.grpo.policy_group import PolicyGroup
from megatron_rl.grpo.policy_worker import PolicySpec
from megatron_rl.models.hf_config import load_hf_config
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.router_replay import check_usable


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
        collective_timeout_s=collective_timeout_s(cfg.run.watchdog),
        router_replay=cfg.policy.router_replay,
    )
    check_usable(cfg.policy.router_replay, load_hf_config(model_dir), par.cp)
    table = placement.check(cfg)
    # GPU: the bundles also reserve the colocated engines' share of the ranks' GPUs and CPUs.
    bundles = placement.policy_bundles(cfg, table) if table.gpu else None
    gpus = placement.policy_rank_gpus(cfg, table)
    return PolicyGroup(
        spec, world_size(cfg), gpus_per_rank=gpus, cpus_per_rank=cfg.cluster.cpus_per_rank, bundles=bundles
    )


def derive_num_engines(cfg: Any) -> int:
    """`generation.num_engines`, or when 0/null what the layout gives: one on CPU; colocated on GPU, one per
    `generation.tp * generation.pp` policy GPUs; separate, one per as many of the pool's `generation.gpus`
    (megatron_rl.placement's table, which every part reads). A layout that cannot be placed is a
    LayoutError naming why."""
    return len(placement.check(cfg).engines)


def build_engine(
    cfg: Any, model_dir: str, policy_group: Any = None, bundle_of_rank: list[int] | None = None
) -> EngineGroup:
    """The engine group; on GPU its engines are placed by megatron_rl.placement: colocated ones in
    `policy_group` (the policy's placement group; rank r in bundle `bundle_of_rank[r]`) beside their ranks,
    separate ones in placement groups of their own."""
    g = cfg.generation
    settings = EngineSettings(
        tp=g.tp,
        pp=g.pp,
        expert_parallel=g.expert_parallel,
        max_model_len=g.max_model_len,
        gpu_memory_utilization=g.gpu_memory_utilization,
        enforce_eager=g.enforce_eager,
        dtype=hf_name(cfg.model.dtype),
        cpu_kv_cache_gb=g.cpu_kv_cache_gb,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.run.seed,
        return_routing=cfg.policy.router_replay != "off",
        sleep_level=colocation.sleep_level(cfg),
    )
    table = placement.check(cfg)
    refit = RefitSettings(transport=g.refit_transport, bucket_mb=g.refit_bucket_mb, timeout_s=g.timeout_s)

    def start_engine(index: int) -> EngineClient:
        return EngineClient(
            model_dir,
            settings,
            num_cpus=cfg.cluster.cpus_per_rank,
            resources=placement.engine_resources(cfg, table, index, policy_group, bundle_of_rank)
            if table.gpu
            else None,
            timeout_s=g.timeout_s,
            refit=refit,
            log_name=f"engine{index}",
        )

    return EngineGroup(
        start_engine, derive_num_engines(cfg), g.max_failures, g.timeout_s, sleep_level=settings.sleep_level
    )
