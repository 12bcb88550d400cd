"""The per-GPU memory plan of a composed config: the config mapped onto the formulas of
megatron_rl.planner.memory, with a check per budget that must hold and, when one fails, the fix for its
largest part.

Assumptions (printed with the plan):
- GPU: Transformer Engine's fused/flash attention, so attention scores are never stored.
- Colocated generation time-shares each GPU (megatron_rl/colocation.py): with generation.sleep_level 1 or
  2 vLLM releases its weights and KV cache while Megatron trains (~1 GiB left), with 0 it keeps its whole
  share; while vLLM generates, Megatron keeps its weights and whatever policy.offload_during_generation
  leaves (null: the least offload that makes the generation phase fit).
  vLLM takes gpu_memory_utilization * GPU memory for its weights, runtime and KV cache.
- Budget: 92% of GPU memory; the rest covers the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_rl.planner.layout import check_layout, resolve_arch
from megatron_rl.planner.memory import (
    GIB,
    Arch,
    Layout,
    StageMemory,
    kv_bytes_per_token,
    resident_during_generation,
    training_stages,
    vllm_weight_bytes,
)

HEADROOM = 0.92
VLLM_RUNTIME_GIB = 2.0  # profiling activations, sampler buffers and CUDA graphs inside vLLM's share
VLLM_ASLEEP_GIB = 1.0  # what a sleeping engine keeps (CUDA graphs, context)
VLLM_CPU_RUNTIME_GIB = 0.5  # a CPU engine's process and buffers beside its weights and KV cache


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Plan:
    arch: Arch
    layout: Layout
    world: int
    stages: list[StageMemory]
    phases: dict[str, float]  # GiB
    budget_gib: float
    device: str
    checks: list[Check] = field(default_factory=list)
    engine: bool = True  # GRPO plans include the vLLM engine
    sleep_level: int = 0  # colocated engines' vLLM sleep level while Megatron trains
    offload: str = "none"  # policy.offload_during_generation, as given or derived

    @property
    def fits(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


def plan(cfg: Any, algo: str = "grpo") -> Plan:
    """The memory plan of a composed config for `algo` (GRPO adds the vLLM engine; SFT and DPO train only).
    Layout errors raise LayoutError; memory shortfalls are failed checks in the returned Plan, so the
    report can show every component before saying why."""
    from megatron_rl.config.schema import world_size

    rollouts = algo == "grpo"
    arch = resolve_arch(cfg)
    lay = check_layout(cfg, arch, generation=rollouts)
    p, c = cfg.policy, cfg.cluster
    tokens = max(p.micro_batch_tokens, p.max_seq_len)  # a sequence is never split across micro-batches
    stages = training_stages(
        arch, lay, cfg.model.dtype, p.optim.use_distributed_optimizer, tokens, p.max_seq_len, p.recompute
    )
    worst = max(stages, key=lambda s: s.total)
    gpu = bool(c.gpus_per_node)
    ranks = world_size(cfg)
    budget = HEADROOM * c.gpu_memory_gb if gpu else c.host_memory_gb
    # CPU: every rank (and the engine) share the host's memory.
    train = worst.total / GIB if gpu else ranks * worst.total / GIB
    phases: dict[str, float] = {"training": train, "generation": 0.0}
    checks = [Check("layout", True, f"tp={lay.tp} pp={lay.pp} cp={lay.cp} ep={lay.ep} dp={lay.dp}")]
    share, colocated = 0.0, {"sleep_level": 0, "offload": "none"}
    if rollouts:
        share, colocated = _plan_engine(cfg, arch, worst, phases, checks, budget)
    for phase in ("training", "generation") if gpu and rollouts else ("training",):
        total = phases[phase]
        ok = total <= budget
        label = f"{phase} phase" if gpu else "host memory"
        detail = f"{total:.1f} GiB of {budget:.1f} GiB"
        if not gpu:
            detail += f" ({ranks} ranks x {worst.total / GIB:.1f} GiB" + (
                " + the engine)" if rollouts else ")"
            )
        if not ok:
            detail += _advice(phase, worst, share, p.recompute, colocated["offload"])
        checks.append(Check(label, ok, detail))
    return Plan(
        arch, lay, ranks, stages, phases, budget, "gpu" if gpu else "cpu", checks, rollouts, **colocated
    )


def _plan_engine(
    cfg: Any, arch: Arch, worst: StageMemory, phases: dict[str, float], checks: list[Check], budget: float
) -> tuple[float, dict[str, Any]]:
    """vLLM's part: weights, runtime and KV cache within its share; adds to the phases; returns the share
    and the colocation settings (sleep level, offload) the phases assume."""
    from megatron_rl import colocation
    from megatron_rl.placement import engine_width, num_engines

    g, c = cfg.generation, cfg.cluster
    gpu = bool(c.gpus_per_node)
    settings: dict[str, Any] = {"sleep_level": 0, "offload": cfg.policy.get("offload_during_generation") or "none"}
    elt = 2 if cfg.model.dtype == "bf16" else 4
    width = engine_width(cfg)  # GPUs one engine shards its weights over (the runtime's arithmetic)
    weights = vllm_weight_bytes(arch, width, elt) / GIB
    runtime = VLLM_RUNTIME_GIB if gpu else VLLM_CPU_RUNTIME_GIB
    if gpu:
        share = g.gpu_memory_utilization * c.gpu_memory_gb
        kv = share - weights - runtime
        if g.colocated:
            level = colocation.sleep_level(cfg)
            phases["training"] += VLLM_ASLEEP_GIB if level else share
            given = cfg.policy.get("offload_during_generation")
            fitting = [
                o
                for o in colocation.OFFLOAD_CHOICES
                if resident_during_generation(worst, o) / GIB + share <= budget
            ]
            offload = given or (fitting[0] if fitting else colocation.OFFLOAD_CHOICES[-1])
            phases["generation"] = resident_during_generation(worst, offload) / GIB + share
            settings = {"sleep_level": level, "offload": offload}
        else:  # its own GPUs
            phases["generation"] = share
        room = share - runtime
    else:
        share, kv = 0.0, g.cpu_kv_cache_gb
        phases["training"] += num_engines(cfg) * (weights + kv + runtime)  # every engine in host memory
        phases["generation"] = phases["training"]
        room = budget - runtime
    kv_tokens = max(kv, 0.0) * GIB / kv_bytes_per_token(arch, int(g.tp), elt, int(g.get("pp") or 1))
    phases.update(
        engines=num_engines(cfg),
        vllm_weights=weights,
        vllm_runtime=runtime,
        vllm_kv_cache=max(kv, 0.0),
        kv_tokens=kv_tokens,
        kv_sequences=kv_tokens / g.max_model_len,
    )
    weights_ok = weights < room
    checks.append(
        Check(
            "vLLM weights",
            weights_ok,
            f"{weights:.2f} GiB per {'GPU' if gpu else 'engine'} at generation.tp={g.tp}"
            + (f" pp={g.pp}" if g.get("pp", 1) > 1 else "")
            + f", room {room:.1f} GiB"
            + ("" if weights_ok or not gpu else ": raise generation.tp or gpu_memory_utilization"),
        )
    )
    kv_ok = kv_tokens >= g.max_model_len
    checks.append(
        Check(
            "vLLM KV cache",
            kv_ok,
            f"{max(kv, 0):.1f} GiB holds {kv_tokens:,.0f} tokens = {phases['kv_sequences']:.1f} sequences of "
            f"generation.max_model_len={g.max_model_len}"
            + ("" if kv_ok else " (vLLM needs at least one): raise gpu_memory_utilization or generation.tp"),
        )
    )
    return share, settings


def _advice(phase: str, stage: StageMemory, vllm_share: float, recompute: str, offload: str = "none") -> str:
    parts = {
        "weights": stage.weights,
        "gradients": stage.grads,
        "optimizer states": stage.optimizer,
        "activations": stage.activations,
        "logits": stage.logits,
    }
    if phase == "generation":
        offloaded = {"none": (), "optimizer": ("optimizer states",)}.get(
            offload, ("optimizer states", "gradients")
        )
        parts = {
            "vLLM share": vllm_share * GIB,
            **{k: v for k, v in parts.items() if k not in ("activations", "logits", *offloaded)},
        }
    name, size = max(parts.items(), key=lambda kv: kv[1])
    fixes = {
        "weights": "raise tp/pp (or ep for experts)",
        "gradients": "raise tp/pp (or ep for experts)",
        "optimizer states": "raise dp or tp/pp, and keep policy.optim.use_distributed_optimizer=true",
        "activations": ("set policy.recompute=full, or " if recompute != "full" else "")
        + "lower policy.micro_batch_tokens, or raise tp/pp/cp",
        "logits": "lower policy.micro_batch_tokens or raise tp",
        "vLLM share": "lower generation.gpu_memory_utilization or raise generation.tp",
    }
    return f"; the largest part is {name} ({size / GIB:.1f} GiB) on the {stage.name}: {fixes[name]}"
