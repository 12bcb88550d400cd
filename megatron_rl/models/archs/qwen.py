"""Qwen2 (qkv bias), Qwen3 (q/k norm) and Qwen3-MoE (q/k norm, routed experts, optional dense layers)."""

from __future__ import annotations

from typing import Any

from megatron_rl.models.archs import Architecture, register
from megatron_rl.models.archs.common import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    QK_NORM,
    QKV_BIAS,
    P,
    dense_config,
    moe_config,
    require,
    routed_experts,
)


def qwen2_config(hf: dict[str, Any]) -> dict[str, Any]:
    return {**dense_config(hf, "Qwen2ForCausalLM"), "add_qkv_bias": True}


def qwen3_config(hf: dict[str, Any]) -> dict[str, Any]:
    return {**dense_config(hf, "Qwen3ForCausalLM"), "qk_layernorm": True}


def qwen3_moe_config(hf: dict[str, Any]) -> dict[str, Any]:
    arch = "Qwen3MoeForCausalLM"
    cfg = {**dense_config(hf, arch), "qk_layernorm": True}
    experts = hf.get("num_experts") or require(hf, "num_local_experts", arch)
    cfg.update(moe_config(hf, arch, experts, require(hf, "moe_intermediate_size", arch)))
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    freq = [0 if (i in dense or (i + 1) % step) else 1 for i in range(cfg["num_layers"])]
    if not all(freq):
        cfg["moe_layer_freq"] = freq
    return cfg


QWEN2 = register(
    Architecture(("Qwen2ForCausalLM",), qwen2_config, EMBEDDINGS + ATTENTION + QKV_BIAS + DENSE_MLP)
)
QWEN3 = register(
    Architecture(("Qwen3ForCausalLM",), qwen3_config, EMBEDDINGS + ATTENTION + QK_NORM + DENSE_MLP)
)
EXPERTS = routed_experts(
    P + "mlp.gate.weight", P + "mlp.experts.{E}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
)
# DENSE_MLP covers the layers listed in mlp_only_layers.
QWEN3_MOE = register(
    Architecture(
        ("Qwen3MoeForCausalLM",), qwen3_moe_config, EMBEDDINGS + ATTENTION + QK_NORM + EXPERTS + DENSE_MLP
    )
)
