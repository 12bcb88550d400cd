"""Clear errors for an unsupported architecture, an indivisible layout and a world-size mismatch."""

from __future__ import annotations

import pytest

from megatron_rl.errors import LayoutError, UnsupportedArchitectureError
from megatron_rl.models.hf_config import transformer_config_from_hf
from megatron_rl.models.tiny import tiny_config
from megatron_rl.parallel import ModelShape, ParallelConfig, validate_layout

SHAPE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=384, num_experts=4)


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        transformer_config_from_hf({"architectures": ["GPT2LMHeadModel"]}, ParallelConfig())
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
        "Qwen3MoeForCausalLM",
        "MixtralForCausalLM",
    ):
        assert arch in msg


def test_unsupported_rope_scaling_is_named():
    hf = tiny_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        transformer_config_from_hf(hf, ParallelConfig())


def test_llama3_rope_scaling_translates():
    hf = tiny_config(
        "llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg, info = transformer_config_from_hf(hf, ParallelConfig())
    assert info.rope_scaling and info.rope_scaling_factor == 32.0
    assert cfg.num_query_groups == 2 and cfg.kv_channels == 32


def test_moe_translation():
    cfg, info = transformer_config_from_hf(tiny_config("qwen3_moe", mlp_only_layers=[0]), ParallelConfig())
    assert cfg.num_moe_experts == 4 and cfg.moe_router_topk == 2 and cfg.moe_ffn_hidden_size == 64
    assert cfg.qk_layernorm and cfg.moe_layer_freq == [0, 1, 1, 1]
    assert not cfg.moe_router_pre_softmax  # norm_topk_prob=True


def test_deepseek_v3_translation_and_refusals():
    """MLA with YaRN (refused for the Llama family above), dense first layers, shared experts, sigmoid routing
    with its bias kept as loaded, group-limited top-k, routed scaling, MTP; what Megatron cannot reproduce
    is named."""
    cfg, info = transformer_config_from_hf(tiny_config("deepseek_v3"), ParallelConfig())
    assert type(cfg).__name__ == "MLATransformerConfig" and cfg.multi_latent_attention
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim) == (64, 512, 32, 64)
    assert (cfg.rope_type, cfg.rotary_scaling_factor, cfg.original_max_position_embeddings) == ("yarn", 4.0, 128)
    assert cfg.moe_layer_freq == [0, 1, 1] and cfg.moe_shared_expert_intermediate_size == 64
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
    assert cfg.moe_router_bias_update_rate == 0.0 and cfg.moe_router_topk_scaling_factor == 2.5
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (4, 2) and cfg.mtp_num_layers == 1
    for bad, why in (
        ({"rope_interleave": False}, "rope_interleave=false"),
        ({"topk_group": 1}, "num_experts_per_tok / topk_group must be 2"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "YaRN only"),
    ):
        with pytest.raises(UnsupportedArchitectureError, match=why):
            transformer_config_from_hf(tiny_config("deepseek_v3", **bad), ParallelConfig())


@pytest.mark.parametrize(
    "par, world, pattern",
    [
        (
            ParallelConfig(tp=3),
            3,
            r"attention heads \(4\) are not divisible by tp=3.*choose tp among \[1, 2, 4\]",
        ),
        (ParallelConfig(pp=3), 3, r"layers \(4\) are not divisible by pp\*vpp=3"),
        (ParallelConfig(ep=3), 3, r"experts \(4\) are not divisible by ep=3"),
        (ParallelConfig(tp=1, sequence_parallel=True), 1, r"sequence_parallel=true needs tp>1"),
        (ParallelConfig(tp=2), 3, r"World size 3 is not divisible by tp\*pp\*cp = 2\*1\*1 = 2"),
        (ParallelConfig(tp=2, ep=2), 2, r"ep=2 x etp=2 must divide tp\*cp\*dp=2"),
    ],
)
def test_layout_errors_name_the_number_to_change(par, world, pattern):
    with pytest.raises(LayoutError, match=pattern):
        validate_layout(par, SHAPE, world)


def test_valid_layout_derives_data_parallel():
    assert validate_layout(ParallelConfig(tp=2, pp=2), SHAPE, 8) == 2
    assert validate_layout(ParallelConfig(tp=2, ep=2, etp=1), SHAPE, 4) == 2


def test_deepseek_v3_without_its_routing_keys_tells_the_engine_what_the_trainer_assumes():
    # A checkpoint saved by transformers lacks both keys: Megatron reads sigmoid + bias correction, vLLM
    # would read softmax without the bias and fail to load `e_score_correction_bias` (KeyError at start).
    from megatron_rl.models.archs import engine_hf_overrides

    hf = tiny_config("deepseek_v3")
    assert engine_hf_overrides(hf) == {}
    del hf["scoring_func"], hf["topk_method"]
    assert engine_hf_overrides(hf) == {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    assert engine_hf_overrides(tiny_config("llama")) == {}
    assert engine_hf_overrides({"architectures": ["NotAModel"]}) == {}
