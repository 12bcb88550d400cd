"""Builds the Megatron GPT model chunks for this rank from a Hugging Face config."""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.models.hf_config import ArchInfo, transformer_config_from_hf
from megatron_rl.models.spec import decoder_block_spec, mtp_block_spec
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

    from megatron_rl import platform

    config, info = transformer_config_from_hf(hf_config, parallel, dtype, **config_overrides)
    validate_layout(parallel, info.shape(config), dist.get_world_size() if dist.is_initialized() else 1)
    chunks = []
    for vp_stage in range(parallel.vpp or 1):
        vp = vp_stage if parallel.vpp else None
        model = gpt_model(
            config,
            info,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp,
        )
        chunks.append(model.to(platform.device()))
    mtp_built(config)
    return chunks, config, info


def gpt_model(config: Any, info: ArchInfo, pre_process: bool, post_process: bool, vp_stage: int | None = None) -> Any:
    """One GPTModel chunk (on the current default device: the converters build it on "meta")."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    block = decoder_block_spec(config, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=info.vocab_size,
        max_sequence_length=info.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=info.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(info.rotary_base),
        rope_scaling=info.rope_scaling,
        rope_scaling_factor=info.rope_scaling_factor,
        mtp_block_spec=mtp_block_spec(config, block, vp_stage) if post_process else None,
        vp_stage=vp_stage,
    )
    # Converters and refit look the mapping table up by this name; the MTP layer count names their HF tensors.
    model.hf_architecture = info.architecture
    model.mtp_layers = config.mtp_num_layers or 0
    keep_mtp_frozen(model)
    return model


def keep_mtp_frozen(model: Any) -> None:
    """Multi-token-prediction layers are converted, checkpointed and refitted but neither run nor trained:
    Megatron's forward would need labels to run them (it returns their loss, not logits), and RL trains the
    next-token head only. Frozen parameters stay out of the gradient buffers and the optimizer; so does the
    embedding copy a last pipeline stage holds for them."""
    if getattr(model, "mtp_process", False):
        model.mtp_process = False
        frozen = list(model.mtp.parameters())
        if not model.pre_process:
            frozen += list(model.embedding.parameters())
        for p in frozen:
            p.requires_grad_(False)


def mtp_built(config: Any) -> None:
    """Once every chunk is built (with its MTP layers): the forward, its loss scaling and the embedding-gradient
    reduction read mtp_num_layers, and must all see a model without MTP (keep_mtp_frozen)."""
    config.mtp_num_layers = None
