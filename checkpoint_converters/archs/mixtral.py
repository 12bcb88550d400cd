"""Mixtral: Llama attention with block-sparse MoE (w1 = gate, w3 = up, w2 = down)."""

from checkpoint_converters.archs.common import ATTENTION, EMBEDDINGS, M, P
from checkpoint_converters.mapping import ArchMapping, Rule, register

X = P + "block_sparse_moe.experts.{E}."


@register("MixtralForCausalLM")
def mixtral() -> ArchMapping:
    return ArchMapping(
        EMBEDDINGS
        + ATTENTION
        + (
            Rule(M + "mlp.router.weight", (P + "block_sparse_moe.gate.weight",)),
            Rule(
                M + "mlp.experts.local_experts.{E}.linear_fc1.weight",
                (X + "w1.weight", X + "w3.weight"),
                "gate_up",
            ),
            Rule(M + "mlp.experts.local_experts.{E}.linear_fc2.weight", (X + "w2.weight",), "row"),
        )
    )
