"""DeepSeek-V3 (and the models built on its architecture, e.g. Moonlight-16B-A3B).

Multi-latent attention (q/kv LoRA down-projections with their norms, decoupled rope dims, YaRN), the first
`first_k_dense_replace` layers dense, the rest MoE with shared experts and sigmoid routing: the score
correction bias (`e_score_correction_bias`, Megatron's router buffer `expert_bias`) picks experts but does not
weight them, group-limited top-k, the routed scaling factor. The multi-token-prediction (MTP) layers are
converted and kept (Megatron's MTP block holds them, frozen, outside the forward: see builder.keep_mtp_frozen);
HF stores them as `model.layers.{num_hidden_layers + i}` with their own copies of the embedding and LM head.
"""

from __future__ import annotations

from typing import Any

from checkpoint_converters.mapping import Rule
from megatron_rl.errors import UnsupportedArchitectureError
from megatron_rl.models.archs import Architecture, register
from megatron_rl.models.archs.common import (
    DENSE_MLP,
    EMBEDDINGS,
    NORMS,
    M,
    P,
    dense_config,
    require,
    routed_experts,
)

ARCH = "DeepseekV3ForCausalLM"
A = M + "self_attention."
H = P + "self_attn."

MLA = (
    Rule(A + "linear_q_down_proj.weight", (H + "q_a_proj.weight",), "column"),
    Rule(A + "q_layernorm.weight", (H + "q_a_layernorm.weight",)),
    Rule(A + "linear_q_up_proj.weight", (H + "q_b_proj.weight",), "column"),
    Rule(A + "linear_q_proj.weight", (H + "q_proj.weight",), "column"),  # q_lora_rank null (Moonlight)
    Rule(A + "linear_kv_down_proj.weight", (H + "kv_a_proj_with_mqa.weight",), "column"),
    Rule(A + "kv_layernorm.weight", (H + "kv_a_layernorm.weight",)),
    Rule(A + "linear_kv_up_proj.weight", (H + "kv_b_proj.weight",), "column"),
    Rule(A + "linear_proj.weight", (H + "o_proj.weight",), "row"),
)
MOE = routed_experts(
    P + "mlp.gate.weight", P + "mlp.experts.{E}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
) + (
    Rule(M + "mlp.router.expert_bias", (P + "mlp.gate.e_score_correction_bias",), buffer=True),
    Rule(
        M + "mlp.shared_experts.linear_fc1.weight",
        (P + "mlp.shared_experts.gate_proj.weight", P + "mlp.shared_experts.up_proj.weight"),
        "gate_up",
    ),
    Rule(M + "mlp.shared_experts.linear_fc2.weight", (P + "mlp.shared_experts.down_proj.weight",), "row"),
)
LAYER = NORMS + MLA + DENSE_MLP + MOE

# MTP layer {M} is HF layer {T} = num_hidden_layers + M: its own norms and projection, then a full decoder layer.
T = "model.layers.{T}."
MTP = (
    Rule("mtp.layers.{M}.enorm.weight", (T + "enorm.weight",)),
    Rule("mtp.layers.{M}.hnorm.weight", (T + "hnorm.weight",)),
    Rule("mtp.layers.{M}.eh_proj.weight", (T + "eh_proj.weight",), "column"),
    Rule("mtp.layers.{M}.final_layernorm.weight", (T + "shared_head.norm.weight",)),
) + tuple(
    Rule(
        r.megatron.replace(M, "mtp.layers.{M}.transformer_layer."),
        tuple(h.replace(P, T) for h in r.hf),
        r.kind,
        r.buffer,
    )
    for r in LAYER
)
# Megatron's MTP layers use the model's embedding and output layer; HF stores copies of both.
COPIES = {
    T + "embed_tokens.weight": "model.embed_tokens.weight",
    T + "shared_head.head.weight": "lm_head.weight",
}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not scaling:
        return dict(
            rope_type="rope", rotary_base=theta, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0
        )
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise UnsupportedArchitectureError(
            f"{ARCH} with rope scaling {scaling} is not supported (YaRN only)."
        )
    return dict(
        rope_type="yarn",
        rotary_base=theta,
        rotary_scaling_factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 4096)),
        beta_fast=float(scaling.get("beta_fast", 32.0)),
        beta_slow=float(scaling.get("beta_slow", 1.0)),
        mscale=float(scaling.get("mscale", 1.0)),
        mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)),
    )


def config(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("rope_interleave", True) is False:
        raise UnsupportedArchitectureError(
            f"{ARCH} with rope_interleave=false is not supported: Megatron's MLA rope takes interleaved pairs."
        )
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UnsupportedArchitectureError(
            f"{ARCH} with scoring_func={hf.get('scoring_func')!r}, topk_method={hf.get('topk_method')!r} is not "
            f"supported (sigmoid scores with the noaux_tc bias correction, as DeepSeek-V3 publishes)."
        )
    if not hf.get("norm_topk_prob", True):
        raise UnsupportedArchitectureError(
            f"{ARCH} with norm_topk_prob=false is not supported (Megatron renormalises)."
        )
    cfg = dense_config(hf, ARCH)
    layers, heads = cfg["num_layers"], cfg["num_attention_heads"]
    nope, rope = require(hf, "qk_nope_head_dim", ARCH), require(hf, "qk_rope_head_dim", ARCH)
    experts, topk = require(hf, "n_routed_experts", ARCH), require(hf, "num_experts_per_tok", ARCH)
    groups, topk_groups = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if groups > 1 and topk // topk_groups != 2:
        # HF ranks groups by their top-2 scores, Megatron by their top-(topk / topk_group).
        raise UnsupportedArchitectureError(
            f"{ARCH} with n_group={groups}: num_experts_per_tok / topk_group must be 2 (got {topk}/{topk_groups})."
        )
    dense_layers = min(hf.get("first_k_dense_replace") or 0, layers)
    mtp = hf.get("num_nextn_predict_layers") or 0
    cfg.update(
        multi_latent_attention=True,
        num_query_groups=heads,
        kv_channels=nope + rope,
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=require(hf, "kv_lora_rank", ARCH),
        qk_head_dim=nope,
        qk_pos_emb_head_dim=rope,
        v_head_dim=require(hf, "v_head_dim", ARCH),
        qk_layernorm=True,  # the q/kv LoRA norms (the local spec builds them only with this flag)
        **_rope(hf),
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=require(hf, "moe_intermediate_size", ARCH),
        moe_shared_expert_intermediate_size=require(hf, "moe_intermediate_size", ARCH)
        * (hf.get("n_shared_experts") or 0)
        or None,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        # The bias is a weight of the published model; RL keeps it as loaded (and refits it to the engine).
        moe_router_bias_update_rate=0.0,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=topk_groups if groups > 1 else None,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_layer_freq=[0] * dense_layers + [1] * (layers - dense_layers),
        mtp_num_layers=mtp or None,
    )
    return cfg


def planner(hf: dict[str, Any]) -> dict[str, Any]:
    """MLA projections, shared experts, dense first layers and MTP layers for megatron_rl.planner.memory.Arch."""
    return dict(
        experts=hf.get("n_routed_experts") or 0,
        moe_ffn=hf.get("moe_intermediate_size") or 0,
        shared_ffn=(hf.get("moe_intermediate_size") or 0) * (hf.get("n_shared_experts") or 0),
        dense_layers=hf.get("first_k_dense_replace") or 0,
        mtp_layers=hf.get("num_nextn_predict_layers") or 0,
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        kv_heads=hf["num_attention_heads"],
    )


DEEPSEEK_V3 = register(
    Architecture(
        (ARCH,),
        config,
        EMBEDDINGS + LAYER + MTP,
        copies=COPIES,
        planner=planner,
        own_rope_scaling=True,
        # transformers' DeepseekV3Config has neither key (it always scores with a sigmoid and the bias
        # correction) and saves checkpoints without them, where vLLM would fall back to softmax scores.
        engine_defaults={"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
    )
)
