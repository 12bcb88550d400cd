"""Checks that an engine holds exactly the weights a trainer exported (Llama-family names)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# vLLM fuses these HF projections into one parameter, in this order along the output dimension.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def as_engine_layout(hf: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """HF-named tensors rearranged as a tp=1 vLLM Llama holds them (fused q/k/v and gate/up)."""
    hf = dict(hf)
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        m = re.match(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", name)
        if not m:
            out[name] = t
            continue
        fused = next(f for f, parts in FUSED.items() if m.group(2) in parts)
        key = f"{m.group(1)}.{fused}.weight"
        if key not in out:
            out[key] = torch.cat([hf[f"{m.group(1)}.{p}.weight"] for p in FUSED[fused]])
    return out


def assert_same_weights(
    engine_weights: dict[str, torch.Tensor], hf: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Every engine parameter equals the exported tensor bit for bit (same dtype), and none is left out."""
    want = as_engine_layout(hf)
    assert set(engine_weights) == set(want), set(engine_weights) ^ set(want)
    for name, got in engine_weights.items():
        assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
        assert torch.equal(got, want[name]), f"{name}: max diff {(got - want[name]).abs().max().item()}"
