"""Mixtral: Llama attention with block-sparse MoE (w1 = gate, w3 = up, w2 = down)."""

from __future__ import annotations

from typing import Any

from megatron_rl.models.archs import Architecture, register
from megatron_rl.models.archs.common import (
    ATTENTION,
    EMBEDDINGS,
    P,
    dense_config,
    moe_config,
    require,
    routed_experts,
)


def mixtral_config(hf: dict[str, Any]) -> dict[str, Any]:
    arch = "MixtralForCausalLM"
    cfg = dense_config(hf, arch)
    cfg.update(moe_config(hf, arch, require(hf, "num_local_experts", arch), cfg["ffn_hidden_size"]))
    cfg["moe_router_pre_softmax"] = False  # Mixtral always renormalises the top-k weights
    return cfg


EXPERTS = routed_experts(
    P + "block_sparse_moe.gate.weight",
    P + "block_sparse_moe.experts.{E}.",
    "w1.weight",
    "w3.weight",
    "w2.weight",
)
MIXTRAL = register(Architecture(("MixtralForCausalLM",), mixtral_config, EMBEDDINGS + ATTENTION + EXPERTS))
