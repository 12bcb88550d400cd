"""Advantage estimators over groups of samples that share a prompt (samples of a group are contiguous)."""

from __future__ import annotations

import torch

from megatron_rl.algorithms.registry import register_advantage


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Reward minus its group's mean, optionally divided by the group's (unbiased) std + eps."""
    g = rewards.float().view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


@register_advantage("rloo")
def rloo_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Leave-one-out baseline: reward minus the mean of the other samples of its group."""
    g = rewards.float().view(-1, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)
