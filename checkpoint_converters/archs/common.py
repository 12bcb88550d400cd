"""Rules shared by the Llama-style decoder families (attention, norms, embeddings, dense SwiGLU MLP)."""

from checkpoint_converters.mapping import Rule

P = "model.layers.{L}."
M = "decoder.layers.{L}."

EMBEDDINGS = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "column"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "column"),
)
ATTENTION = (
    Rule(M + "input_layernorm.weight", (P + "input_layernorm.weight",)),
    Rule(
        M + "self_attention.linear_qkv.weight",
        (P + "self_attn.q_proj.weight", P + "self_attn.k_proj.weight", P + "self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule(M + "self_attention.linear_proj.weight", (P + "self_attn.o_proj.weight",), "row"),
    Rule(M + "pre_mlp_layernorm.weight", (P + "post_attention_layernorm.weight",)),
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
