"""Llama and Mistral: embeddings, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

from typing import Any

from megatron_rl.errors import UnsupportedArchitectureError
from megatron_rl.models.archs import Architecture, register
from megatron_rl.models.archs.common import ATTENTION, DENSE_MLP, EMBEDDINGS, dense_config

RULES = EMBEDDINGS + ATTENTION + DENSE_MLP


def llama_config(hf: dict[str, Any]) -> dict[str, Any]:
    return dense_config(hf, "LlamaForCausalLM")


def mistral_config(hf: dict[str, Any]) -> dict[str, Any]:
    arch = "MistralForCausalLM"
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        raise UnsupportedArchitectureError(
            f"{arch} with sliding_window={hf['sliding_window']} is not supported: Megatron's attention here is "
            f"full causal. Set sliding_window to null only if the model was trained without it."
        )
    return dense_config(hf, arch)


LLAMA = register(Architecture(("LlamaForCausalLM",), llama_config, RULES))
MISTRAL = register(Architecture(("MistralForCausalLM",), mistral_config, RULES))
