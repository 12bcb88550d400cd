"""What the Llama-style decoder families share: config fields and the mapping rules of embeddings,
grouped-query attention, norms and the dense SwiGLU MLP."""

from __future__ import annotations

from typing import Any

from checkpoint_converters.mapping import Rule
from megatron_rl.errors import UnsupportedArchitectureError, UserError

P = "model.layers.{L}."
M = "decoder.layers.{L}."


def require(hf: dict[str, Any], key: str, arch: str) -> Any:
    if key not in hf:
        raise UserError(f"config.json for {arch} lacks the required field {key!r}.")
    return hf[key]


def dense_config(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    heads = require(hf, "num_attention_heads", arch)
    hidden = require(hf, "hidden_size", arch)
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(
            f"{arch} with hidden_act={hf['hidden_act']!r} is not supported (silu only)."
        )
    return dict(
        num_layers=require(hf, "num_hidden_layers", arch),
        hidden_size=hidden,
        ffn_hidden_size=require(hf, "intermediate_size", arch),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        init_method_std=hf.get("initializer_range", 0.02),
        add_qkv_bias=bool(hf.get("attention_bias", False)),
    )


def moe_config(hf: dict[str, Any], arch: str, num_experts: int, moe_ffn: int) -> dict[str, Any]:
    return dict(
        num_moe_experts=num_experts,
        moe_router_topk=require(hf, "num_experts_per_tok", arch),
        moe_ffn_hidden_size=moe_ffn,
        # softmax over all experts then top-k renormalised == top-k then softmax over the k (pre_softmax off).
        moe_router_pre_softmax=not hf.get("norm_topk_prob", True),
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
    )


EMBEDDINGS = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "column"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "column"),
)
NORMS = (
    Rule(M + "input_layernorm.weight", (P + "input_layernorm.weight",)),
    Rule(M + "pre_mlp_layernorm.weight", (P + "post_attention_layernorm.weight",)),
)
ATTENTION = NORMS + (
    Rule(
        M + "self_attention.linear_qkv.weight",
        (P + "self_attn.q_proj.weight", P + "self_attn.k_proj.weight", P + "self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule(M + "self_attention.linear_proj.weight", (P + "self_attn.o_proj.weight",), "row"),
)
QKV_BIAS = (
    Rule(
        M + "self_attention.linear_qkv.bias",
        (P + "self_attn.q_proj.bias", P + "self_attn.k_proj.bias", P + "self_attn.v_proj.bias"),
        "qkv",
    ),
)
QK_NORM = (
    Rule(M + "self_attention.q_layernorm.weight", (P + "self_attn.q_norm.weight",)),
    Rule(M + "self_attention.k_layernorm.weight", (P + "self_attn.k_norm.weight",)),
)
DENSE_MLP = (
    Rule(M + "mlp.linear_fc1.weight", (P + "mlp.gate_proj.weight", P + "mlp.up_proj.weight"), "gate_up"),
    Rule(M + "mlp.linear_fc2.weight", (P + "mlp.down_proj.weight",), "row"),
)


def routed_experts(router_hf: str, expert_hf: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router + routed experts: `router_hf` the router weight's HF name, `expert_hf` the prefix of expert {E}."""
    return (
        Rule(M + "mlp.router.weight", (router_hf,)),
        Rule(
            M + "mlp.experts.local_experts.{E}.linear_fc1.weight",
            (expert_hf + gate, expert_hf + up),
            "gate_up",
        ),
        Rule(M + "mlp.experts.local_experts.{E}.linear_fc2.weight", (expert_hf + down,), "row"),
    )
