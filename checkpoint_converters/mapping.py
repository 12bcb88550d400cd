"""Per-architecture mapping tables and the machinery that resolves a Megatron parameter name to HF names.

A table is a list of `Rule(megatron, hf, kind)` with `{L}` (global layer), `{E}` (global expert), `{M}` (MTP
layer) and `{T}` (the HF layer index of MTP layer M: num_hidden_layers + M) placeholders. Each architecture's
table lives in its module under megatron_rl/models/archs/ with the rest of what the project knows about it.
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
    # A module buffer the model needs as a weight (the router's expert_bias): loaded, exported and refitted like
    # a parameter, never trained, kept in its own dtype (fp32) whatever the model's.
    buffer: bool = False

    @property
    def expert(self) -> bool:
        return "{E}" in self.megatron


@dataclass(frozen=True)
class ArchMapping:
    rules: tuple[Rule, ...]
    tied_embeddings_hf: str = "lm_head.weight"
    copies: tuple[tuple[str, str], ...] = ()  # (HF copy template, HF source name): written, never read

    @property
    def buffers(self) -> tuple[str, ...]:
        """Last name parts of the module buffers that are weights (e.g. "router.expert_bias")."""
        return tuple(".".join(r.megatron.split(".")[-2:]) for r in self.rules if r.buffer)

    def copies_of(self, hf_name: str, num_layers: int, mtp_layers: int) -> list[str]:
        return [
            copy.format(T=num_layers + m)
            for copy, source in self.copies
            if source == hf_name
            for m in range(mtp_layers)
        ]


def mapping_for(architecture: str) -> ArchMapping:
    from megatron_rl.models import archs

    try:
        arch = archs.get(architecture)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"No checkpoint mapping: {exc}") from None
    return ArchMapping(tuple(arch.rules), copies=tuple(arch.copies.items()))


def named_weights(model: Any, mapping: ArchMapping) -> Any:
    """(name, tensor) of every parameter, then of every buffer the mapping treats as a weight."""
    yield from model.named_parameters()
    if mapping.buffers:
        for name, buf in model.named_buffers():
            if name.endswith(mapping.buffers):
                yield name, buf


# Transformer Engine fuses the pre-attention/pre-MLP norms into the following linear and names experts
# "weight<E>" under grouped GEMM; map those spellings onto the local-spec names the tables use.
_ALIASES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)$"), r"mlp.experts.local_experts.\2.\1.weight"),
    (re.compile(r"self_attention\.linear_q_up_proj\.layer_norm_weight$"), "self_attention.q_layernorm.weight"),
    (re.compile(r"self_attention\.linear_kv_up_proj\.layer_norm_weight$"), "self_attention.kv_layernorm.weight"),
]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
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
    mapping: ArchMapping,
    megatron_name: str,
    layer_offset: int,
    expert_offset: int,
    tied: bool,
    num_layers: int = 0,
) -> Resolved | None:
    """Maps a (stage-local) Megatron parameter name to its rule and global HF names. None = not mapped
    (the tied output layer on the last stage). `num_layers`: the decoder's, for MTP layers' HF indices."""
    name = canonical(megatron_name)
    values: dict[str, Any] = {}
    m, mtp = _LAYER.match(name), _MTP.match(name)
    if m or mtp:
        if m:
            values["L"] = int(m.group(1)) + layer_offset
            prefix = "decoder.layers.{L}."
        else:  # every MTP layer sits on the last pipeline stage: its index is global
            values["M"] = int(mtp.group(1))
            values["T"] = num_layers + values["M"]
            prefix = "mtp.layers.{M}."
        tail = (m or mtp).group(2)
        e = _EXPERT.match(tail)
        if e:
            values["E"] = int(e.group(2)) + expert_offset
            template_tail = f"{e.group(1)}.local_experts.{{E}}.{e.group(3)}"
        else:
            template_tail = tail
        template = prefix + template_tail
    else:
        template = name
    if tied and template == "output_layer.weight":
        return None
    for rule in mapping.rules:
        if rule.megatron == template:
            return Resolved(rule, tuple(h.format(**values) for h in rule.hf))
    raise KeyError(f"Megatron parameter {megatron_name!r} has no rule in the mapping table")
