"""`python -m megatron_rl.launch plan conf=NAME`: prints a run's memory plan as a table with its checks and
exits nonzero when it does not fit."""

from __future__ import annotations

import sys
from typing import Any

from megatron_rl.planner.memory import GIB
from megatron_rl.planner.run_plan import HEADROOM, Plan, plan


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
            f"vLLM ({ph['engines']:.0f} engines of generation.tp={cfg.generation.tp}"
            + (f" pp={cfg.generation.pp}" if cfg.generation.get("pp", 1) > 1 else "")
            + (" with expert parallel" if cfg.generation.get("expert_parallel") else "")
            + f"): weights "
            f"{ph['vllm_weights']:.1f}, runtime "
            f"{ph['vllm_runtime']:.1f}, KV cache {ph['vllm_kv_cache']:.1f} GiB "
            f"({ph['kv_tokens']:,.0f} tokens, {ph['kv_sequences']:.1f} full-length sequences)"
        )
    if p.device == "cpu":
        note = f"CPU: {p.world} ranks" + (", the engine and its KV cache" if p.engine else "")
        note += " share cluster.host_memory_gb"
    else:
        note = "assumes: flash attention (no stored scores)"
        if p.engine and cfg.generation.colocated:
            kept = {"none": "all its state", "optimizer": "its weights and gradients"}.get(
                p.offload, "its weights"
            )
            engine = f"sleeps (level {p.sleep_level})" if p.sleep_level else "keeps its share"
            note += (
                f"; colocated vLLM {engine} while Megatron trains, Megatron keeps {kept} on the GPU while "
                f"vLLM generates (policy.offload_during_generation={p.offload})"
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
