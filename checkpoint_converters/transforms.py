"""The shared tensor transforms between HF and Megatron layouts, each with its inverse. Written once, used by
every architecture table, by offline conversion (TP=1 layout) and by live load/export (any TP size).

Kinds of mapping, named as Megatron names its tensor-parallel layers:
- "replicated": same tensor on every rank (norms, router).
- "column": column parallel, Megatron's ColumnParallelLinear and VocabParallelEmbedding: the output dim is
  split, weight dim 0 (the embedding, the output layer; qkv and fc1 too, in their own kinds below).
- "row": row parallel, Megatron's RowParallelLinear: the input dim is split, weight dim 1 (o_proj, down_proj).
- "qkv": HF q/k/v -> Megatron's fused tensor grouped per KV head [q heads of group g; k_g; v_g]; TP splits
  whole groups, so each rank's shard is the fused tensor of its own groups.
- "gate_up": HF gate/up -> Megatron fc1; each TP rank holds [gate shard r; up shard r].

`hf_slices` says which part of each HF tensor a TP rank needs (so a rank reads only its bytes) and
`assemble` builds the rank's shard from those parts; `to_megatron` (whole tensors in) is their composition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The weight dim each kind splits over TP: Megatron's `partition_dim` of the parameter.
SPLIT_DIM: dict[str, int | None] = {"replicated": None, "column": 0, "row": 1, "qkv": 0, "gate_up": 0}
KINDS = tuple(SPLIT_DIM)

# (dim, start, stop) of an HF tensor, or None for the whole tensor.
Slice = tuple[int, int, int] | None


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


def _part(length: int, rank: int, size: int) -> tuple[int, int]:
    step = length // size
    return rank * step, (rank + 1) * step


def hf_slices(kind: str, shapes: Sequence[Sequence[int]], rank: int, size: int) -> list[Slice]:
    """The part of each HF tensor (given their full shapes) that TP rank `rank` of `size` needs.

    For "qkv" the contiguous rows of q, k and v that belong to the rank's KV groups: heads are stored
    group by group in HF q/k/v, so whole groups are contiguous row ranges."""
    if size == 1 or kind == "replicated":
        return [None] * len(shapes)
    if kind == "row":
        return [(1, *_part(shapes[0][1], rank, size))]
    if kind in ("column", "qkv", "gate_up"):
        return [(0, *_part(s[0], rank, size)) for s in shapes]
    raise ValueError(f"unknown mapping kind {kind!r}")


def take(tensor: torch.Tensor, piece: Slice) -> torch.Tensor:
    return tensor if piece is None else tensor.narrow(piece[0], piece[1], piece[2] - piece[1])


def assemble(
    kind: str, parts: list[torch.Tensor], heads: int = 0, groups: int = 0, size: int = 1
) -> torch.Tensor:
    """A TP rank's Megatron shard from its HF parts (see hf_slices); heads/groups are the global counts."""
    if kind in ("replicated", "column", "row"):
        return parts[0]
    if kind == "qkv":
        return fuse_qkv(*parts, heads // size, groups // size)
    if kind == "gate_up":
        return torch.cat(parts, dim=0)
    raise ValueError(f"unknown mapping kind {kind!r}")


def to_megatron(
    kind: str, hf: list[torch.Tensor], rank: int, size: int, heads: int = 0, groups: int = 0
) -> torch.Tensor:
    """This TP rank's Megatron shard from the whole HF tensor(s) of one mapping."""
    pieces = hf_slices(kind, [t.shape for t in hf], rank, size)
    return assemble(kind, [take(t, p) for t, p in zip(hf, pieces)], heads, groups, size)


def to_megatron_pieces(
    kind: str, hf: list[torch.Tensor], rank: int, size: int, heads: int = 0, groups: int = 0
) -> list[torch.Tensor]:
    """Like to_megatron, as pieces whose concatenation along dim 0 is the shard: "gate_up" gives its two
    halves uncopied (Megatron stores them as separate chunks anyway), everything else one tensor."""
    if kind == "gate_up":
        pieces = hf_slices(kind, [t.shape for t in hf], rank, size)
        return [take(t, p) for t, p in zip(hf, pieces)]
    return [to_megatron(kind, hf, rank, size, heads, groups)]


def to_hf(kind: str, shards: list[torch.Tensor], heads: int = 0, groups: int = 0) -> list[torch.Tensor]:
    """HF tensor(s) from all TP shards of one Megatron parameter (in TP rank order)."""
    if kind == "replicated" or (kind in ("column", "row") and len(shards) == 1):
        return [shards[0]]
    if kind in ("column", "row"):
        return [torch.cat(shards, dim=SPLIT_DIM[kind])]
    if kind == "qkv":
        per_rank = [split_qkv(s, heads // len(shards), groups // len(shards)) for s in shards]
        return (
            [torch.cat([p[i] for p in per_rank], dim=0) for i in range(3)]
            if len(shards) > 1
            else list(per_rank[0])
        )
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        if len(shards) == 1:  # contiguous views, no copy
            return list(halves[0])
        return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]
    raise ValueError(f"unknown mapping kind {kind!r}")
