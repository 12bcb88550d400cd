"""From a composed config to the planner's model and layout: the architecture's numbers (the recipe's
model.arch, completed from the checkpoint's config.json) and the Megatron and vLLM layout rules that need them.

`check_layout` is cheap (no torch, no Ray): preflight checks call it before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_rl.errors import LayoutError, UserError
from megatron_rl.planner.memory import Arch, Layout

_ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


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
            f"under model.arch (see megatron_rl/conf/model/*.yaml)."
        )
    heads = a["num_attention_heads"]
    experts = a.get("num_experts") or 0
    numbers = dict(
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
    # What the dense decoder's numbers do not cover (MLA, shared experts...): the architecture's own module.
    numbers.update(_family_numbers(a.get("architecture") or (a.get("architectures") or [None])[0], a))
    if numbers["experts"] and not numbers["top_k"]:
        numbers["top_k"] = a.get("num_experts_per_tok") or 0
    return Arch(**numbers)


def _family_numbers(family: str | None, numbers: dict[str, Any]) -> dict[str, Any]:
    """The architecture module's planner numbers (megatron_rl/models/archs), when it has any."""
    if family is None:
        return {}
    from megatron_rl.models import archs

    if family not in archs.supported() or archs.get(family).planner is None:
        return {}
    try:
        return archs.get(family).planner(numbers)
    except KeyError as exc:
        raise UserError(f"Cannot plan a {family}: model.arch lacks {exc.args[0]} (its config.json name).") from None


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
        first_layers=par.first_stage_layers or 0,
        last_layers=par.last_stage_layers or 0,
    )


def _generation_layout_problems(cfg: Any, arch: Arch) -> list[str]:
    from megatron_rl.placement import placement

    g = cfg.generation
    problems = []
    if arch.heads % g.tp:
        problems.append(f"generation.tp={g.tp} must divide the attention heads ({arch.heads}) for vLLM")
    if g.get("expert_parallel") and not arch.experts:
        problems.append(
            f"generation.expert_parallel=true needs a mixture-of-experts model; model.hf_path={cfg.model.hf_path} is dense"
        )
    if g.get("pp", 1) > arch.layers:
        problems.append(f"generation.pp={g.pp} exceeds the model's {arch.layers} layers")
    # Where engines and ranks sit: the runtime's own table (engines per node, spanning, the separate pool).
    problems += placement(cfg).problems
    if g.max_model_len > cfg.policy.max_seq_len:
        problems.append(
            f"generation.max_model_len ({g.max_model_len}) exceeds policy.max_seq_len "
            f"({cfg.policy.max_seq_len}): the policy must train on every sequence the engine can produce "
            f"(planning for GRPO; for an SFT or DPO recipe use `plan sft` / `plan dpo`)"
        )
    return problems
