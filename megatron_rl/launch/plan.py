"""Per-GPU memory plan of a recipe: `python -m megatron_rl.launch plan conf=NAME`.

Formulas (bytes per GPU; P = parameters held by the GPU):
- Parameters held: dense params / (tp * pp) + expert params / (ep * etp * pp); embeddings and the LM head
  are split over tp and live on the first/last stage (the larger of the two is counted).
- Weights: 2 B/param (bf16) or 4 (fp32). Gradients: 4 B/param (Megatron DDP reduces in fp32).
- Optimizer (Adam, mixed precision): fp32 master + m + v = 12 B/param, divided by dp under the
  distributed optimizer (dp for experts = the expert-data-parallel size).
- Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Table 2, with tensor + sequence parallelism): s*b*h*(34/tp + 5*a*s/(h*tp)) bytes; with selective
  recomputation (attention scores recomputed; flash/SDPA never stores them) s*b*h*34/tp; with full
  recomputation 2*s*b*h/tp (the layer input only). The first pipeline stage holds pp micro-batches in flight
  under 1F1B, so it holds layers_per_stage * pp micro-batches' activations.
- vLLM: bf16 weights / generation tp, plus the KV cache it reserves (gpu_memory_utilization * GPU memory
  minus its weights). Colocated, the two phases time-share the GPU (vLLM sleeps - weights offloaded, KV freed -
  while Megatron trains; Megatron's grads and optimizer state are offloaded while vLLM generates, its bf16
  weights stay for the refit), so the peak is max(training, generation + policy weights).
"""

from __future__ import annotations

import sys
from typing import Any

from megatron_rl.errors import UserError

GPU_GB = 80.0  # H100 80GB; the recipes' target
HEADROOM = 0.92  # allocator fragmentation, NCCL and CUDA context


def parameter_counts(a: dict[str, Any]) -> tuple[float, float, float]:
    """(dense per-layer-stack params, expert params, embedding params) from published config numbers."""
    h, layers, heads, kv = a["hidden_size"], a["num_layers"], a["heads"], a["kv_heads"]
    head_dim = a.get("head_dim", h // heads)
    attn = h * head_dim * (heads + 2 * kv) + heads * head_dim * h
    experts = a.get("experts") or 0
    if experts:
        dense_mlp, expert = 0, experts * 3 * h * a["moe_ffn"] + experts * h
    else:
        dense_mlp, expert = 3 * h * a["ffn"], 0
    return layers * (attn + dense_mlp + 2 * h), layers * expert, a["vocab"] * h


def plan(cfg: Any) -> dict[str, float]:
    from megatron_rl.launch.slurm import check_layout

    a = cfg.arch
    if not a:
        raise UserError(f"Recipe {cfg.recipe!r} has no `arch` numbers to plan with.")
    dp = check_layout(cfg)
    par = cfg.policy.parallel
    etp = par.etp if par.etp is not None else par.tp
    dense, expert, embed = parameter_counts(a)
    tied = a.get("tie_word_embeddings", False)
    # One embedding-sized matrix per stage at most (input embedding on the first, LM head on the last).
    held = dense / (par.tp * par.pp) + expert / (par.ep * etp * par.pp) + embed / par.tp
    total_params = dense + expert + embed * (1 if tied else 2)
    expert_dp = max(1, dp * par.tp * par.cp // (par.ep * etp))
    wbytes = 2 if cfg.model.dtype == "bf16" else 4
    dense_held = held - expert / (par.ep * etp * par.pp)
    gb = 1024**3
    weights = held * wbytes / gb
    grads = held * 4 / gb
    optim = 12 * (dense_held / dp + (expert / (par.ep * etp * par.pp)) / expert_dp) / gb
    s, b, h, heads = cfg.policy.max_seq_len, 1, a["hidden_size"], a["heads"]
    tokens_per_mb = max(1, cfg.policy.micro_batch_tokens // s)  # sequences per micro-batch
    b = tokens_per_mb
    per_layer = {
        "none": s * b * h * (34 / par.tp + 5 * heads * s / (h * par.tp)),
        "selective": s * b * h * 34 / par.tp,
        "full": 2 * s * b * h / par.tp,
    }
    if cfg.policy.recompute not in per_layer:
        raise UserError(f"policy.recompute must be one of {sorted(per_layer)}, got {cfg.policy.recompute!r}.")
    layers_per_stage = a["num_layers"] / par.pp
    activations = per_layer[cfg.policy.recompute] * layers_per_stage * par.pp / gb
    logits = b * s * a["vocab"] / par.tp * 4 * 2 / gb  # fp32 logits and their gradient on the last stage
    train_total = weights + grads + optim + activations + logits
    g = cfg.generation
    vllm_weights = total_params * 2 / g.tp / gb
    kv_cache = max(0.0, g.gpu_memory_utilization * GPU_GB - vllm_weights)
    generation_total = vllm_weights + kv_cache + (weights if g.colocated else 0.0)
    total = max(train_total, generation_total) if g.colocated else train_total
    return {
        "params_total_b": total_params / 1e9,
        "generation_total_gb": generation_total,
        "params_per_gpu_b": held / 1e9,
        "dp": dp,
        "weights_gb": weights,
        "grads_gb": grads,
        "optimizer_gb": optim,
        "activations_gb": activations,
        "logits_gb": logits,
        "train_total_gb": train_total,
        "vllm_weights_gb": vllm_weights,
        "vllm_kv_cache_gb": kv_cache,
        "total_gb": total,
        "budget_gb": GPU_GB * HEADROOM,
    }


def main(cfg: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    p = plan(cfg)
    table = Table(title=f"{cfg.recipe}: per-GPU memory plan (H100 80 GB)")
    table.add_column("component")
    table.add_column("GB", justify="right")
    for key in (
        "weights_gb",
        "grads_gb",
        "optimizer_gb",
        "activations_gb",
        "logits_gb",
        "train_total_gb",
        "vllm_weights_gb",
        "vllm_kv_cache_gb",
        "generation_total_gb",
        "total_gb",
        "budget_gb",
    ):
        table.add_row(key.removesuffix("_gb"), f"{p[key]:.1f}")
    console = Console(file=sys.stdout)
    console.print(table)
    console.print(
        f"params {p['params_total_b']:.1f}B total, {p['params_per_gpu_b']:.2f}B per GPU, dp={p['dp']}"
    )
    if p["vllm_weights_gb"] > p["budget_gb"] * cfg.generation.gpu_memory_utilization:
        print(
            f"error: does not fit: vLLM weights alone are {p['vllm_weights_gb']:.1f} GB per GPU, more than "
            f"generation.gpu_memory_utilization allows; raise generation.tp.",
            file=sys.stderr,
        )
        return 1
    if p["total_gb"] > p["budget_gb"]:
        biggest = max(("weights_gb", "grads_gb", "optimizer_gb", "activations_gb"), key=p.get)
        print(
            f"error: does not fit: {p['total_gb']:.1f} GB > {p['budget_gb']:.1f} GB per GPU; the largest part "
            f"is {biggest.removesuffix('_gb')} ({p[biggest]:.1f} GB): raise tp/pp/ep, enable recompute, or "
            f"lower generation.gpu_memory_utilization.",
            file=sys.stderr,
        )
        return 1
    print("fits", file=sys.stderr)
    return 0
