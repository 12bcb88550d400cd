"""Advantage estimators over groups of samples that share a prompt.

Samples of one prompt are contiguous: rewards[g * group_size : (g + 1) * group_size] is group g. Every
estimator returns one advantage per sample (a sequence-level advantage, broadcast over its tokens by the
loss).
"""

from __future__ import annotations

import torch

from megatron_rl.algorithms.registry import register_advantage
from megatron_rl.errors import UserError


def _groups(rewards: torch.Tensor, group_size: int, what: str) -> torch.Tensor:
    if rewards.dim() != 1:
        raise UserError(
            f"{what}: rewards must be a 1-D tensor [num_prompts * group_size], got {tuple(rewards.shape)}."
        )
    if group_size < 2:
        # A group of one has no baseline: its advantage would be 0 (or NaN after std scaling).
        raise UserError(
            f"{what} needs at least 2 samples per prompt (grpo.num_generations), got {group_size}."
        )
    if rewards.numel() % group_size:
        raise UserError(
            f"{what}: {rewards.numel()} rewards do not split into groups of {group_size} (grpo.num_generations)."
        )
    return rewards.float().view(-1, group_size)


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """(r - mean(group)) [/ (std(group) + eps)], std unbiased (n - 1). A group of equal rewards gets 0."""
    g = _groups(rewards, group_size, "grpo advantages")
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


@register_advantage("rloo")
def rloo_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """r - mean of the *other* samples of the group (REINFORCE leave-one-out). Equals
    group_size / (group_size - 1) times the mean-centred reward; optional std scaling as in grpo."""
    g = _groups(rewards, group_size, "rloo advantages")
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    adv = g - baseline
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)
