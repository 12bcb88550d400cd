"""The typed schema of every run's configuration (Hydra composes YAML onto it; OmegaConf checks types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_rl.data.arithmetic import ArithmeticConfig
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.optim import OptimConfig


@dataclass
class RunConfig:
    name: str = "run"
    dir: str | None = None  # default: runs/<name>
    seed: int = 42
    steps: int = 20
    resume: bool | None = None  # None: resume when the run directory holds a checkpoint
    checkpoint_every: int = 10
    keep_last: int = 2
    export_hf_at_end: bool = True
    eval_every: int = 0
    eval_size: int = 64


@dataclass
class ModelConfig:
    hf_path: str = "tiny:llama"  # a local HF directory, or tiny:<arch> (built into the run directory)
    dtype: str = "fp32"
    trust_remote_code: bool = False
    warmup_sft_steps: int = 0  # tiny models only: SFT warm start so RL has signal to amplify


@dataclass
class PolicyConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_tokens: int = 4096
    max_seq_len: int = 1024
    recompute: str = "none"


@dataclass
class GenerationConfig:
    backend: str = "vllm"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    tp: int = 1
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    colocated: bool = True
    refit_bucket_mb: int = 512
    cpu_kv_cache_gb: float = 1.0


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8
    num_generations: int = 8
    advantage: str = "grpo"
    normalize_std: bool = True
    loss: str = "clipped_pg"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    loss_agg: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    tis_cap: float | None = 2.0
    dynamic_sampling: bool = False
    max_refill_batches: int = 2
    overlong_filter: bool = False


@dataclass
class SFTConfig:
    batch_size: int = 16
    val_every: int = 10
    val_fraction: float = 0.1
    packing: bool = True


@dataclass
class DPOConfig:
    beta: float = 0.1
    sft_weight: float = 0.0
    length_average: bool = False
    batch_size: int = 8


@dataclass
class DataConfig:
    kind: str = "arithmetic"
    path: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    system_prompt: str | None = None
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    val_size: int = 64


@dataclass
class EnvConfig:
    name: str = "math"


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: str = "offline"
    project: str = "megatron-rl"
    metrics_jsonl: bool = True


@dataclass
class ClusterConfig:
    launcher: str = "local"
    profile: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU ranks
    cpus_per_rank: float = 0.5
    ranks: int = 2  # policy ranks when gpus_per_node == 0 (CPU)
    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    recipe: str = "tiny"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Published architecture numbers for recipes whose weights are not on disk (planner, dry runs).
    arch: dict[str, Any] = field(default_factory=dict)


def world_size(cfg: Any) -> int:
    c = cfg.cluster
    return c.nodes * c.gpus_per_node if c.gpus_per_node else c.ranks
