"""Advantage estimators over groups of samples that share a prompt.

`groups` is either an int, the group size, for contiguous groups of equal size (rewards[g * group_size :
(g + 1) * group_size] is group g), or a 1-D tensor of each sample's group id: then groups may have any size
and order (multi-turn episodes: a failed episode leaves its group smaller). A group of one has no baseline:
its advantage is 0. Every estimator returns one advantage per sample (a sequence-level advantage, broadcast
over its tokens by the loss).
"""

from __future__ import annotations

import torch

from megatron_rl.algorithms.registry import register_advantage
from megatron_rl.errors import UserError

Groups = int | torch.Tensor  # a group size (contiguous equal groups) or each sample's group id


def group_stats(rewards: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: its group's size, reward sum and unbiased std (0 for a group of one)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.shape != rewards.shape:
        raise UserError(f"{rewards.numel()} rewards but {ids.numel()} group ids.")
    _, inverse = torch.unique(ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    r = rewards.double()
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / count
    sq = torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return count[inverse], total[inverse], std[inverse]


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
    rewards: torch.Tensor, group_size: Groups, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """(r - mean(group)) [/ (std(group) + eps)], std unbiased (n - 1). A group of equal rewards gets 0."""
    if torch.is_tensor(group_size):
        count, total, std = group_stats(rewards, group_size)
        adv = rewards.double() - total / count
        if normalize_std:
            adv = adv / (std + eps)
        return adv.float()
    g = _groups(rewards, group_size, "grpo advantages")
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


@register_advantage("rloo")
def rloo_advantages(
    rewards: torch.Tensor, group_size: Groups, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """r - mean of the *other* samples of the group (REINFORCE leave-one-out). Equals
    group_size / (group_size - 1) times the mean-centred reward; optional std scaling as in grpo."""
    if torch.is_tensor(group_size):
        count, total, std = group_stats(rewards, group_size)
        r = rewards.double()
        adv = torch.where(count > 1, r - (total - r) / (count - 1).clamp(min=1), torch.zeros_like(r))
        if normalize_std:
            adv = adv / (std + eps)
        return adv.float()
    g = _groups(rewards, group_size, "rloo advantages")
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    adv = g - baseline
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)
