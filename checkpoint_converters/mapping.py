"""Per-architecture mapping tables and the machinery that resolves a Megatron parameter name to HF names.

A table is a list of `Rule(megatron, hf, kind)` with `{L}` (global layer) and `{E}` (global expert)
placeholders. Tables are declared in `checkpoint_converters/archs/*.py` and registered by HF architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megatron_rl.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str = "replicated"

    @property
    def expert(self) -> bool:
        return "{E}" in self.megatron


@dataclass(frozen=True)
class ArchMapping:
    rules: tuple[Rule, ...]
    tied_embeddings_hf: str = "lm_head.weight"


_REGISTRY: dict[str, ArchMapping] = {}


def register(*architectures: str):
    def deco(fn):
        mapping = fn()
        for arch in architectures:
            _REGISTRY[arch] = mapping
        return fn

    return deco


def mapping_for(architecture: str) -> ArchMapping:
    from checkpoint_converters import archs  # noqa: F401  (registers every table)

    if architecture not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"No checkpoint mapping for architecture {architecture!r}; supported: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[architecture]


# Transformer Engine fuses the pre-attention/pre-MLP norms into the following linear and names experts
# "weight<E>" under grouped GEMM; map those spellings onto the local-spec names the tables use.
_ALIASES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)$"), r"mlp.experts.local_experts.\2.\1.weight"),
]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*)\.local_experts\.(\d+)\.(.+)$")


def canonical(name: str) -> str:
    for pattern, repl in _ALIASES:
        name = pattern.sub(repl, name)
    return name


@dataclass(frozen=True)
class Resolved:
    rule: Rule
    hf_names: tuple[str, ...]


def resolve(
    mapping: ArchMapping, megatron_name: str, layer_offset: int, expert_offset: int, tied: bool
) -> Resolved | None:
    """Maps a (stage-local) Megatron parameter name to its rule and global HF names. None = not mapped
    (the tied output layer on the last stage)."""
    name = canonical(megatron_name)
    values: dict[str, Any] = {}
    m = _LAYER.match(name)
    if m:
        values["L"] = int(m.group(1)) + layer_offset
        tail = m.group(2)
        e = _EXPERT.match(tail)
        if e:
            values["E"] = int(e.group(2)) + expert_offset
            template_tail = f"{e.group(1)}.local_experts.{{E}}.{e.group(3)}"
        else:
            template_tail = tail
        template = "decoder.layers.{L}." + template_tail
    else:
        template = name
    if tied and template == "output_layer.weight":
        return None
    for rule in mapping.rules:
        if rule.megatron == template:
            return Resolved(rule, tuple(h.format(**values) for h in rule.hf))
    raise KeyError(f"Megatron parameter {megatron_name!r} has no rule in the mapping table")
