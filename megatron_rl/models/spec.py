"""Layer specs: Transformer Engine on GPU when it imports, Megatron's local modules elsewhere.

The local spec's torch-norm wrapper refuses sequence parallelism, so local layers use `RMSNorm` below,
whose weight is tagged `sequence_parallel` so Megatron all-reduces its gradient over the TP group.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from megatron_rl import platform


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 like Hugging Face's Llama/Qwen norms (bit-compatible outputs)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under SP each TP rank normalises a different slice of the sequence: the grads must be summed.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SDPAttention(torch.nn.Module):
    """Causal core attention through torch's scaled_dot_product_attention (fused, GQA-aware).

    Megatron's local DotProductAttention materialises [b*h, s, s] scores with baddbmm + masked softmax;
    SDPA's fused kernels are several times faster and lighter on memory where Transformer Engine is absent.
    Takes Megatron's core-attention interface: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn].
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal self-attention only, got {attn_mask_type}")
        self.scale = softmax_scale or config.softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed (THD) sequences need Transformer Engine attention")
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.scale,
            enable_gqa=k.shape[1] != heads,
            dropout_p=self.dropout if self.training else 0.0,
        )
        # -1, not heads * dim: multi-latent attention's values are narrower than its queries and keys.
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def transformer_engine_available() -> bool:
    if platform.use_cpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def decoder_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    """The TransformerBlockSubmodules holding only this pipeline stage's layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = transformer_engine_available()
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if use_te:
        return block
    block = copy.deepcopy(block)
    for layer in block.layer_specs:
        sub = layer.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
        attn = sub.self_attention.submodules
        attn.core_attention = SDPAttention
        if config.qk_layernorm:
            attn.q_layernorm = RMSNorm
            if config.multi_latent_attention:  # the q and kv LoRA down-projections' norms
                attn.kv_layernorm = RMSNorm
            else:
                attn.k_layernorm = RMSNorm
    block.layer_norm = RMSNorm
    return block


def mtp_block_spec(config: Any, block: Any, vp_stage: int | None = None) -> Any:
    """Megatron's multi-token-prediction block spec (None without MTP layers or off the last stage), its
    layer being the decoder's last with the local norms above."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine=transformer_engine_available(),
                                  vp_stage=vp_stage)
    if spec is None or transformer_engine_available():
        return spec
    for layer in spec.layer_specs:
        layer.submodules.enorm = layer.submodules.hnorm = layer.submodules.layer_norm = RMSNorm
    return spec
