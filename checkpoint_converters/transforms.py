"""The shared tensor transforms between HF and Megatron layouts, each with its inverse.

Kinds of mapping:
- "replicated": same tensor on every rank (norms, router).
- "row": split along dim 0 over TP (embedding, lm head); "column": split along dim 1 (o_proj, down_proj).
- "qkv": HF q/k/v -> Megatron's fused tensor grouped per KV head [q heads of group g; k_g; v_g], TP splits
  whole groups.
- "gate_up": HF gate/up -> Megatron fc1; each TP rank holds [gate shard r; up shard r].
"""

from __future__ import annotations

import torch

KINDS = ("replicated", "row", "column", "qkv", "gate_up")


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """HF q [nq*d, ...], k/v [ng*d, ...] -> Megatron [ng * (nq/ng + 2) * d, ...] (TP=1 layout)."""
    d = k.shape[0] // num_groups
    per = num_heads // num_groups
    rest = q.shape[1:]
    qg = q.reshape(num_groups, per * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, ...]:
    """Inverse of fuse_qkv (TP=1 layout in, HF q, k, v out)."""
    per = num_heads // num_groups
    rest = fused.shape[1:]
    d = fused.shape[0] // (num_groups * (per + 2))
    g = fused.reshape(num_groups, (per + 2) * d, *rest)
    q, k, v = g.split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def to_megatron(
    kind: str, hf: list[torch.Tensor], rank: int, size: int, heads: int = 0, groups: int = 0
) -> torch.Tensor:
    """This TP rank's Megatron shard from the HF tensor(s) of one mapping."""
    if kind == "replicated":
        return hf[0]
    if kind == "row":
        return hf[0].chunk(size, dim=0)[rank]
    if kind == "column":
        return hf[0].chunk(size, dim=1)[rank]
    if kind == "qkv":  # whole KV groups per rank: slicing the TP=1 layout along dim 0 is exact
        return fuse_qkv(*hf, heads, groups).chunk(size, dim=0)[rank]
    if kind == "gate_up":
        return torch.cat([hf[0].chunk(size, dim=0)[rank], hf[1].chunk(size, dim=0)[rank]], dim=0)
    raise ValueError(f"unknown mapping kind {kind!r}")


def to_hf(kind: str, shards: list[torch.Tensor], heads: int = 0, groups: int = 0) -> list[torch.Tensor]:
    """HF tensor(s) from all TP shards of one Megatron parameter (in TP rank order)."""
    if kind == "replicated":
        return [shards[0]]
    if kind == "row":
        return [torch.cat(shards, dim=0)]
    if kind == "column":
        return [torch.cat(shards, dim=1)]
    if kind == "qkv":
        return list(split_qkv(torch.cat(shards, dim=0), heads, groups))
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]
    raise ValueError(f"unknown mapping kind {kind!r}")
