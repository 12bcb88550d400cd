"""`python -m megatron_rl.launch plan conf=NAME`: the per-GPU memory plan of a composed config and its layout
checks. Formulas live in megatron_rl.planner; this module maps the config onto them, checks, and reports.

Assumptions (printed with the plan):
- GPU: Transformer Engine's fused/flash attention, so attention scores are never stored.
- Colocated generation time-shares each GPU: vLLM sleeps during training (weights offloaded, KV cache freed,
  ~1 GiB left), while Megatron's weights, gradients and optimizer state stay resident during generation.
  vLLM takes gpu_memory_utilization * GPU memory for its weights, runtime and KV cache.
- Budget: 92% of GPU memory; the rest covers the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rl.errors import LayoutError, UserError
from megatron_rl.planner import (
    GIB,
    Arch,
    Layout,
    StageMemory,
    kv_bytes_per_token,
    training_stages,
    vllm_weight_bytes,
)

HEADROOM = 0.92
VLLM_RUNTIME_GIB = 2.0  # profiling activations, sampler buffers and CUDA graphs inside vLLM's share
VLLM_ASLEEP_GIB = 1.0  # what a sleeping engine keeps (CUDA graphs, context)
VLLM_CPU_RUNTIME_GIB = 0.5  # a CPU engine's process and buffers beside its weights and KV cache

_ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


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

    @property
    def fits(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


def _hf_numbers(hf_path: str) -> dict[str, Any]:
    if hf_path.startswith("tiny:"):
        from megatron_rl.models.tiny import tiny_config

        try:
            return tiny_config(hf_path.split(":", 1)[1])
        except ValueError as exc:
            raise UserError(f"model.hf_path={hf_path!r}: {exc}.") from None
    file = Path(hf_path) / "config.json"
    if file.is_file():
        return json.loads(file.read_text())
    return {}


def resolve_arch(cfg: Any) -> Arch:
    """The recipe's model.arch numbers, completed from the checkpoint's config.json when it is here."""
    from omegaconf import OmegaConf

    hf = _hf_numbers(cfg.model.hf_path)
    hf = {**hf, "num_experts": hf.get("num_experts") or hf.get("num_local_experts")}
    given = {k: v for k, v in OmegaConf.to_container(cfg.model.arch).items() if v is not None}
    a = {**{k: v for k, v in hf.items() if v is not None}, **given}
    missing = [k for k in _ARCH_FIELDS if k not in a]
    if missing:
        raise UserError(
            f"Cannot plan recipe {cfg.recipe!r}: model.arch lacks {', '.join(missing)} and "
            f"model.hf_path={cfg.model.hf_path!r} has no config.json here. Add the published numbers "
            f"under model.arch (see conf/model/*.yaml)."
        )
    heads = a["num_attention_heads"]
    experts = a.get("num_experts") or 0
    return Arch(
        hidden=a["hidden_size"],
        layers=a["num_hidden_layers"],
        heads=heads,
        kv_heads=a.get("num_key_value_heads") or heads,
        head_dim=a.get("head_dim") or a["hidden_size"] // heads,
        ffn=a["intermediate_size"],
        vocab=a["vocab_size"],
        tied=bool(a.get("tie_word_embeddings", False)),
        experts=experts,
        top_k=(a.get("num_experts_per_tok") or 0) if experts else 0,
        moe_ffn=(a.get("moe_intermediate_size") or a["intermediate_size"]) if experts else 0,
    )


def check_layout(cfg: Any, arch: Arch | None = None, generation: bool = True) -> Layout:
    """megatron_rl.parallel's divisibility rules plus the Megatron (and, for GRPO, vLLM) rules that need the
    config; returns the layout with dp filled in. Raises LayoutError naming every problem."""
    from omegaconf import OmegaConf

    from megatron_rl.config.schema import world_size
    from megatron_rl.parallel import ModelShape, ParallelConfig, validate_layout

    arch = arch or resolve_arch(cfg)
    par = ParallelConfig(**OmegaConf.to_container(cfg.policy.parallel))
    shape = ModelShape(arch.layers, arch.heads, arch.kv_heads, arch.vocab, arch.experts or None)
    dp = validate_layout(par, shape, world_size(cfg))
    problems = []
    if arch.experts and par.tp > 1 and not par.sequence_parallel:
        problems.append(
            "MoE with tp>1 needs policy.parallel.sequence_parallel=true (Megatron refuses to train)"
        )
    if par.vpp and par.vpp > 1 and par.pp == 1:
        problems.append("policy.parallel.vpp>1 (interleaved pipeline) needs pp>1")
    if par.cp > 1 and cfg.policy.max_seq_len % (2 * par.cp):
        problems.append(
            f"context parallelism splits each sequence into 2*cp={2 * par.cp} chunks: policy.max_seq_len "
            f"({cfg.policy.max_seq_len}) must be divisible by it"
        )
    if generation:
        problems += _generation_layout_problems(cfg, arch)
    if problems:
        raise LayoutError("Layout check failed: " + "; ".join(problems) + ".")
    etp = par.etp if par.etp is not None else par.tp
    return Layout(
        tp=par.tp,
        pp=par.pp,
        cp=par.cp,
        ep=par.ep,
        etp=etp if arch.experts else 1,
        dp=dp,
        sp=par.sequence_parallel,
        vpp=par.vpp or 1,
    )


def _generation_layout_problems(cfg: Any, arch: Arch) -> list[str]:
    g, c = cfg.generation, cfg.cluster
    problems = []
    if arch.heads % g.tp:
        problems.append(f"generation.tp={g.tp} must divide the attention heads ({arch.heads}) for vLLM")
    if c.gpus_per_node:
        world = c.nodes * c.gpus_per_node
        if g.colocated and world % g.tp:
            problems.append(f"colocated engines of generation.tp={g.tp} GPUs must tile the {world} GPUs")
        if g.tp > c.gpus_per_node and g.tp % c.gpus_per_node:
            problems.append(
                f"generation.tp={g.tp} spans nodes of {c.gpus_per_node} GPUs unevenly: use whole nodes"
            )
    if g.max_model_len > cfg.policy.max_seq_len:
        problems.append(
            f"generation.max_model_len ({g.max_model_len}) exceeds policy.max_seq_len "
            f"({cfg.policy.max_seq_len}): the policy must train on every sequence the engine can produce "
            f"(planning for GRPO; for an SFT or DPO recipe use `plan sft` / `plan dpo`)"
        )
    return problems


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
    share = 0.0
    if rollouts:
        share = _plan_engine(cfg, arch, worst, phases, checks, budget)
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
            detail += _advice(phase, worst, share, p.recompute)
        checks.append(Check(label, ok, detail))
    return Plan(arch, lay, ranks, stages, phases, budget, "gpu" if gpu else "cpu", checks, rollouts)


def _plan_engine(
    cfg: Any, arch: Arch, worst: StageMemory, phases: dict[str, float], checks: list[Check], budget: float
) -> float:
    """vLLM's part: weights, runtime and KV cache within its share; adds to the phases; returns the share."""
    g, c = cfg.generation, cfg.cluster
    gpu = bool(c.gpus_per_node)
    elt = 2 if cfg.model.dtype == "bf16" else 4
    weights = vllm_weight_bytes(arch, g.tp, elt) / GIB
    runtime = VLLM_RUNTIME_GIB if gpu else VLLM_CPU_RUNTIME_GIB
    if gpu:
        share = g.gpu_memory_utilization * c.gpu_memory_gb
        kv = share - weights - runtime
        if g.colocated:
            phases["training"] += VLLM_ASLEEP_GIB
            phases["generation"] = worst.static / GIB + share
        else:  # its own GPUs
            phases["generation"] = share
        room = share - runtime
    else:
        share, kv = 0.0, g.cpu_kv_cache_gb
        phases["training"] += weights + kv + runtime
        phases["generation"] = phases["training"]
        room = budget - runtime
    kv_tokens = max(kv, 0.0) * GIB / kv_bytes_per_token(arch, g.tp, elt)
    phases.update(
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
            f"{weights:.2f} GiB per {'GPU' if gpu else 'engine'} at generation.tp={g.tp}, room {room:.1f} GiB"
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
    return share


def _advice(phase: str, stage: StageMemory, vllm_share: float, recompute: str) -> str:
    parts = {
        "weights": stage.weights,
        "gradients": stage.grads,
        "optimizer states": stage.optimizer,
        "activations": stage.activations,
        "logits": stage.logits,
    }
    if phase == "generation":
        parts = {
            "vLLM share": vllm_share * GIB,
            **{k: v for k, v in parts.items() if k not in ("activations", "logits")},
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


def report(cfg: Any, p: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    a, lay = p.arch, p.layout
    table = Table(title=f"{cfg.recipe}: per-{p.device.upper()} memory plan (GiB)")
    table.add_column("component")
    for s in p.stages:
        table.add_column(s.name, justify="right")
    for label, key in (
        ("weights", "weights"),
        ("gradients (fp32 main grads)", "grads"),
        ("optimizer states (Adam, sharded)", "optimizer"),
        (f"activations (recompute={cfg.policy.recompute})", "activations"),
        ("logits", "logits"),
        ("training state total", "total"),
    ):
        table.add_row(label, *(f"{getattr(s, key) / GIB:.2f}" for s in p.stages))
    out = Console(file=sys.stdout, width=110)
    out.print(table)
    ph = p.phases
    out.print(
        f"model: {a.total_params() / 1e9:.2f}B params ({a.active_params() / 1e9:.2f}B active), "
        f"{max(s.params for s in p.stages) / 1e9:.2f}B on the fullest GPU; world {p.world}, "
        f"tp={lay.tp} pp={lay.pp} cp={lay.cp} ep={lay.ep} etp={lay.etp} dp={lay.dp} sp={lay.sp}"
    )
    if "vllm_weights" in ph:
        out.print(
            f"vLLM (generation.tp={cfg.generation.tp}): weights {ph['vllm_weights']:.1f}, runtime "
            f"{ph['vllm_runtime']:.1f}, KV cache {ph['vllm_kv_cache']:.1f} GiB "
            f"({ph['kv_tokens']:,.0f} tokens, {ph['kv_sequences']:.1f} full-length sequences)"
        )
    if p.device == "cpu":
        note = f"CPU: {p.world} ranks" + (", the engine and its KV cache" if p.engine else "")
        note += " share cluster.host_memory_gb"
    else:
        note = "assumes: flash attention (no stored scores)"
        if p.engine:
            note += (
                "; colocated vLLM sleeps while Megatron trains and Megatron's state stays resident while "
                "vLLM generates"
            )
        note += f"; budget {HEADROOM:.0%} of device memory"
    out.print(note, highlight=False)
    for c in p.checks:
        out.print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}", markup=False, highlight=False)


def main(cfg: Any, algo: str = "grpo") -> int:
    p = plan(cfg, algo)
    report(cfg, p)
    if not p.fits:
        where = f"{p.world} x {cfg.cluster.gpu_memory_gb:g} GiB GPUs" if p.device == "gpu" else "this host"
        print(
            f"error: recipe {cfg.recipe!r} ({algo}) does not fit on {where}: " + " | ".join(p.reasons),
            file=sys.stderr,
        )
        return 1
    peak = max(p.phases["training"], p.phases["generation"])
    print(f"{cfg.recipe} ({algo}): fits ({peak:.1f} of {p.budget_gib:.1f} GiB at the peak)", file=sys.stderr)
    return 0
