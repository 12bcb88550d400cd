"""GRPO batch shaping before the policy update (DAPO's dynamic sampling and overlong filtering)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dynamic_sampling_filter(
    rewards: torch.Tensor, group_size: int, tol: float = 0.0
) -> tuple[list[int], dict[str, float]]:
    """Indices of the groups whose rewards are not all equal (max - min > tol), and how many were kept.

    A group of equal rewards has zero group-relative advantage for every sample: it costs a forward and
    backward pass and only dilutes the token-mean. Samples of group g are rewards[g*G:(g+1)*G]."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    kept = [g for g in range(grouped.shape[0]) if spread[g].item() > tol]
    total = grouped.shape[0]
    return kept, {
        "dynamic_sampling/groups_kept": float(len(kept)),
        "dynamic_sampling/groups_total": float(total),
        "dynamic_sampling/kept_fraction": len(kept) / total if total else 0.0,
    }


def overlong_filter(
    mask: torch.Tensor, finish_reasons: Sequence[str]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Zeroes the loss mask [b, T] of responses cut off by the length limit (finish_reason "length").

    A truncated answer is not necessarily wrong, only unfinished; punishing it teaches "be short", not
    "be right". Its tokens are kept in the batch (they still count for logprob-mismatch metrics)."""
    if len(finish_reasons) != mask.shape[0]:
        raise ValueError(f"{len(finish_reasons)} finish reasons for a mask of {mask.shape[0]} rows")
    truncated = torch.tensor([r == "length" for r in finish_reasons], dtype=torch.bool)
    out = mask.clone()
    out[truncated] = 0
    return out, {
        "overlong/truncated": float(truncated.sum().item()),
        "overlong/masked_tokens": float(mask[truncated].sum().item()),
    }
