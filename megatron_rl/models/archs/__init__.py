"""One module per Hugging Face architecture family: everything the project knows about it in one place.

Each module declares one or more `Architecture`s (Megatron-Bridge style, one object per model):
- `config`: HF config.json -> Megatron TransformerConfig keyword arguments (what differs from the defaults
  that megatron_rl.models.hf_config sets for every model: precision, parallel layout, fusions);
- `rules`: the weight mapping, Megatron name <-> HF name(s), each with its sharding kind
  (checkpoint_converters.transforms); one table drives offline conversion, live load and refit export;
- `copies`: HF tensors that duplicate another one (DeepSeek-V3's MTP embedding and head);
- `planner`: the numbers the memory planner needs beyond the dense decoder's (megatron_rl.planner.memory.Arch);
- `engine_defaults`: config.json keys whose absence the `config` translation reads one way and vLLM another;
  an engine gets them as `hf_overrides` when the checkpoint leaves them out;
- `mla`, `mtp`: the layer-spec changes (multi-latent attention, multi-token prediction) that
  megatron_rl.models.spec applies for it.
Register an architecture with `register(...)` in its module and import the module in `_load_all`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    names: tuple[str, ...]  # HF `architectures` values
    config: Callable[[dict[str, Any]], dict[str, Any]]
    rules: tuple[Any, ...]  # checkpoint_converters.mapping.Rule
    copies: dict[str, str] = field(default_factory=dict)  # HF copy name -> HF source name ({T}: MTP layer)
    planner: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    own_rope_scaling: bool = False  # `config` translates rope scaling itself (YaRN for MLA)
    engine_defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for name in arch.names:
        _REGISTRY[name] = arch
    return arch


def _load_all() -> None:
    from megatron_rl.models.archs import deepseek_v3, llama, mixtral, qwen  # noqa: F401


def supported() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Architecture:
    _load_all()
    if name not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"Unsupported model architecture {name!r}; supported: {', '.join(sorted(_REGISTRY))}. Add one as a "
            f"module in megatron_rl/models/archs/ (see docs/conversion.md)."
        )
    return _REGISTRY[name]


def engine_hf_overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """What a vLLM engine must be told beyond `hf` to run the model the trainer builds from it."""
    names = hf.get("architectures") or []
    _load_all()
    if len(names) != 1 or names[0] not in _REGISTRY:
        return {}
    return {k: v for k, v in _REGISTRY[names[0]].engine_defaults.items() if k not in hf}
