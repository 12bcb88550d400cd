"""Hugging Face config.json -> Megatron TransformerConfig, one small translation per architecture."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_rl import platform
from megatron_rl.errors import UnsupportedArchitectureError, UserError
from megatron_rl.parallel import ModelShape, ParallelConfig

# Megatron's llama3 rope scaling hard-codes these three numbers; other values would silently differ.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class ArchInfo:
    """What GPTModel needs beyond TransformerConfig, plus facts the converter and planner use."""

    architecture: str
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rotary_base: float
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    num_experts: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def shape(self, cfg: Any) -> ModelShape:
        return ModelShape(
            num_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
            vocab_size=self.vocab_size,
            num_experts=self.num_experts,
        )


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """Reads config.json from a model directory (or the file itself) with a clear error when missing."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(
            f"No Hugging Face config.json found at {file}: pass a model directory that holds one."
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{file} is not valid JSON ({exc}).") from exc


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def _require(hf: dict[str, Any], key: str, arch: str) -> Any:
    if key not in hf:
        raise UserError(f"config.json for {arch} lacks the required field {key!r}.")
    return hf[key]


def _dense_common(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    heads = _require(hf, "num_attention_heads", arch)
    hidden = _require(hf, "hidden_size", arch)
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(
            f"{arch} with hidden_act={hf['hidden_act']!r} is not supported (silu only)."
        )
    if hf.get("sliding_window") and hf.get("use_sliding_window", True) and arch.startswith("Mistral"):
        raise UnsupportedArchitectureError(
            f"{arch} with sliding_window={hf['sliding_window']} is not supported: Megatron's attention here is "
            f"full causal. Set sliding_window to null only if the model was trained without it."
        )
    return dict(
        num_layers=_require(hf, "num_hidden_layers", arch),
        hidden_size=hidden,
        ffn_hidden_size=_require(hf, "intermediate_size", arch),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        init_method_std=hf.get("initializer_range", 0.02),
        add_qkv_bias=bool(hf.get("attention_bias", False)),
    )


def _llama(hf: dict[str, Any]) -> dict[str, Any]:
    return _dense_common(hf, "LlamaForCausalLM")


def _mistral(hf: dict[str, Any]) -> dict[str, Any]:
    return _dense_common(hf, "MistralForCausalLM")


def _qwen2(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_dense_common(hf, "Qwen2ForCausalLM"), "add_qkv_bias": True}


def _qwen3(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_dense_common(hf, "Qwen3ForCausalLM"), "qk_layernorm": True}


def _moe_common(hf: dict[str, Any], arch: str, num_experts: int, moe_ffn: int) -> dict[str, Any]:
    return dict(
        num_moe_experts=num_experts,
        moe_router_topk=_require(hf, "num_experts_per_tok", arch),
        moe_ffn_hidden_size=moe_ffn,
        # softmax over all experts then top-k renormalised == top-k then softmax over the k (pre_softmax off).
        moe_router_pre_softmax=not hf.get("norm_topk_prob", True),
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
    )


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    arch = "Qwen3MoeForCausalLM"
    cfg = {**_dense_common(hf, arch), "qk_layernorm": True}
    experts = hf.get("num_experts") or _require(hf, "num_local_experts", arch)
    cfg.update(_moe_common(hf, arch, experts, _require(hf, "moe_intermediate_size", arch)))
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    freq = [0 if (i in dense or (i + 1) % step) else 1 for i in range(cfg["num_layers"])]
    if not all(freq):
        cfg["moe_layer_freq"] = freq
    return cfg


def _mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    arch = "MixtralForCausalLM"
    cfg = _dense_common(hf, arch)
    experts = _require(hf, "num_local_experts", arch)
    cfg.update(_moe_common(hf, arch, experts, cfg["ffn_hidden_size"]))
    cfg["moe_router_pre_softmax"] = False  # Mixtral always renormalises the top-k weights
    return cfg


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "MixtralForCausalLM": _mixtral,
}


def architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"Unsupported model architecture {archs or '(none given)'} in config.json; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add one in megatron_rl/models/hf_config.py and a mapping in "
            f"checkpoint_converters (see docs/conversion.md)."
        )
    return archs[0]


def transformer_config_from_hf(
    hf: dict[str, Any], parallel: ParallelConfig, dtype: torch.dtype = torch.float32, **overrides: Any
) -> tuple[Any, ArchInfo]:
    """Returns (TransformerConfig, ArchInfo) for an HF config dict. Raises UnsupportedArchitectureError."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = architecture_of(hf)
    kwargs = ARCHITECTURES[arch](hf)
    theta, scaling = _rope(hf)
    info = ArchInfo(
        architecture=arch,
        vocab_size=_require(hf, "vocab_size", arch),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rotary_base=theta,
        num_experts=kwargs.get("num_moe_experts"),
    )
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3" or any(float(scaling.get(k, v)) != v for k, v in _LLAMA3_FIXED.items()):
            raise UnsupportedArchitectureError(
                f"rope scaling {scaling} is not supported; supported: llama3 with "
                f"{_LLAMA3_FIXED} (Megatron fixes these numbers)."
            )
        info.rope_scaling, info.rope_scaling_factor = True, float(scaling["factor"])
    on_cpu = platform.use_cpu()
    kwargs.update(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp if parallel.etp is not None else parallel.tp,
        sequence_parallel=parallel.sequence_parallel,
        # The fused SwiGLU where platform provides its kernels; other fusions need TE/apex or CUDA.
        bias_activation_fusion=platform.activation_fusion(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=platform.wgrad_accumulation_fusion(),
        persist_layer_norm=False,
        use_cpu_initialization=on_cpu,
        # CPU p2p has no streams to synchronise (see megatron_rl/platform).
        batch_p2p_sync=not on_cpu,
        # The alltoall dispatcher needs CUDA streams and unequal gloo collectives; allgather works on CPU.
        moe_token_dispatcher_type="allgather" if on_cpu and kwargs.get("num_moe_experts") else "alltoall",
        moe_grouped_gemm=False,
    )
    kwargs.update(overrides)
    # Our checks first: they say which number to change, Megatron's assertion would not.
    from megatron_rl.parallel import validate_layout

    validate_layout(
        parallel,
        ModelShape(
            kwargs["num_layers"],
            kwargs["num_attention_heads"],
            kwargs["num_query_groups"],
            info.vocab_size,
            info.num_experts,
        ),
        None,
    )
    if kwargs.get("variable_seq_lengths") and kwargs["moe_token_dispatcher_type"] == "allgather":
        raise UserError(
            "MoE models with pipeline parallelism (pp>1) need Megatron's alltoall token dispatcher, which "
            "runs on GPU only; on CPU use pp=1 for MoE models."
        )
    return TransformerConfig(**kwargs), info
