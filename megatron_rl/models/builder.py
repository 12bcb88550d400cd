"""Builds the Megatron GPT model chunks for this rank from a Hugging Face config."""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.models.hf_config import ArchInfo, transformer_config_from_hf
from megatron_rl.models.spec import decoder_block_spec
from megatron_rl.parallel import ParallelConfig, validate_layout


def build_model(
    hf_config: dict[str, Any],
    parallel: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> list[Any]:
    """Returns this rank's GPTModel chunks (one per virtual pipeline stage), after distributed.initialize().

    Layout rules are checked first so a bad layout fails with a LayoutError naming what to change.
    """
    model, _, _ = build_model_with_config(hf_config, parallel, dtype, **config_overrides)
    return model


def build_model_with_config(
    hf_config: dict[str, Any],
    parallel: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> tuple[list[Any], Any, ArchInfo]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_rl import platform

    config, info = transformer_config_from_hf(hf_config, parallel, dtype, **config_overrides)
    validate_layout(parallel, info.shape(config), dist.get_world_size() if dist.is_initialized() else 1)
    chunks = []
    for vp_stage in range(parallel.vpp or 1):
        vp = vp_stage if parallel.vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, vp_stage=vp),
            vocab_size=info.vocab_size,
            max_sequence_length=info.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=info.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(info.rotary_base),
            rope_scaling=info.rope_scaling,
            rope_scaling_factor=info.rope_scaling_factor,
            vp_stage=vp,
        )
        # Converters and refit look the mapping table up by this name.
        model.hf_architecture = info.architecture
        chunks.append(model.to(platform.device()))
    return chunks, config, info
