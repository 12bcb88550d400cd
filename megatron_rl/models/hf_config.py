"""Hugging Face config.json -> Megatron TransformerConfig: the settings every model shares (precision, the
parallel layout, fusions) here, each architecture's own translation in its module under
megatron_rl/models/archs/."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_rl import platform
from megatron_rl.errors import UnsupportedArchitectureError, UserError
from megatron_rl.models import archs
from megatron_rl.models.archs.common import require
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


def architecture_of(hf: dict[str, Any]) -> str:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in archs.supported():
        raise UnsupportedArchitectureError(
            f"Unsupported model architecture {names or '(none given)'} in config.json; supported: "
            f"{', '.join(archs.supported())}. Add one as a module in megatron_rl/models/archs/ (see "
            f"docs/conversion.md)."
        )
    return names[0]


def transformer_config_from_hf(
    hf: dict[str, Any], parallel: ParallelConfig, dtype: torch.dtype = torch.float32, **overrides: Any
) -> tuple[Any, ArchInfo]:
    """Returns (TransformerConfig, ArchInfo) for an HF config dict. Raises UnsupportedArchitectureError."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = architecture_of(hf)
    family = archs.get(arch)
    kwargs = family.config(hf)
    theta, scaling = _rope(hf)
    info = ArchInfo(
        architecture=arch,
        vocab_size=require(hf, "vocab_size", arch),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rotary_base=theta,
        num_experts=kwargs.get("num_moe_experts"),
    )
    if scaling and not family.own_rope_scaling:
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
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
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
    if kwargs.get("multi_latent_attention"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig(**kwargs), info
    return TransformerConfig(**kwargs), info
