"""Llama and Mistral: embeddings, GQA attention, SwiGLU MLP."""

from checkpoint_converters.archs.common import ATTENTION, DENSE_MLP, EMBEDDINGS
from checkpoint_converters.mapping import ArchMapping, register


@register("LlamaForCausalLM", "MistralForCausalLM")
def llama() -> ArchMapping:
    return ArchMapping(EMBEDDINGS + ATTENTION + DENSE_MLP)
