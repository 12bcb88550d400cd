"""Qwen2 (qkv bias), Qwen3 (q/k norm) and Qwen3-MoE (q/k norm, routed experts, optional dense layers)."""

from checkpoint_converters.archs.common import ATTENTION, DENSE_MLP, EMBEDDINGS, QK_NORM, QKV_BIAS, M, P
from checkpoint_converters.mapping import ArchMapping, Rule, register


@register("Qwen2ForCausalLM")
def qwen2() -> ArchMapping:
    return ArchMapping(EMBEDDINGS + ATTENTION + QKV_BIAS + DENSE_MLP)


@register("Qwen3ForCausalLM")
def qwen3() -> ArchMapping:
    return ArchMapping(EMBEDDINGS + ATTENTION + QK_NORM + DENSE_MLP)


X = P + "mlp.experts.{E}."
EXPERTS = (
    Rule(M + "mlp.router.weight", (P + "mlp.gate.weight",)),
    Rule(
        M + "mlp.experts.local_experts.{E}.linear_fc1.weight",
        (X + "gate_proj.weight", X + "up_proj.weight"),
        "gate_up",
    ),
    Rule(M + "mlp.experts.local_experts.{E}.linear_fc2.weight", (X + "down_proj.weight",), "row"),
)


@register("Qwen3MoeForCausalLM")
def qwen3_moe() -> ArchMapping:
    # DENSE_MLP covers layers listed in mlp_only_layers.
    return ArchMapping(EMBEDDINGS + ATTENTION + QK_NORM + EXPERTS + DENSE_MLP)
