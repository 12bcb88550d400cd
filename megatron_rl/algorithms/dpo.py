"""Direct preference optimisation (Rafailov et al. 2023), optionally with an SFT term on the chosen answer.

For a pair (chosen c, rejected r) with sequence log-likelihoods under the policy (pc, pr) and the frozen
reference (rc, rr):
    chosen_reward = beta * (pc - rc), rejected_reward = beta * (pr - rr)
    loss = -log sigmoid(chosen_reward - rejected_reward) + sft_weight * (-pc / tokens_c)
With length_average the four log-likelihoods are divided by their sequence's token count first (a
length-normalised DPO that stops the policy preferring long answers). The SFT term is always per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from megatron_rl.algorithms.aggregation import masked_sum
from megatron_rl.algorithms.registry import register_policy_loss
from megatron_rl.errors import UserError

Metrics = dict[str, torch.Tensor]


def _check(beta: float, sft_weight: float) -> None:
    if beta <= 0:
        raise UserError(f"dpo.beta must be > 0, got {beta}.")
    if sft_weight < 0:
        raise UserError(f"dpo.sft_weight must be >= 0, got {sft_weight}.")


def dpo_pair_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    length_average: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """Per-pair losses [P] and pair-averaged metrics (this micro-batch's)."""
    _check(beta, sft_weight)
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()
    if (length_average or sft_weight) and (chosen_num_tokens is None or rejected_num_tokens is None):
        raise ValueError("length_average and sft_weight need chosen_num_tokens and rejected_num_tokens")
    if length_average:
        nc, nr = chosen_num_tokens.float().clamp(min=1), rejected_num_tokens.float().clamp(min=1)
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    losses = -F.logsigmoid(margin)
    metrics: Metrics = {
        "dpo_loss": losses.mean().detach(),
        "accuracy": (margin > 0).float().mean(),
        "chosen_reward": chosen_reward.mean().detach(),
        "rejected_reward": rejected_reward.mean().detach(),
        "margin": margin.mean().detach(),
    }
    if sft_weight:
        sft = -policy_chosen_logps.float() / chosen_num_tokens.float().clamp(min=1)
        losses = losses + sft_weight * sft
        metrics["sft_nll"] = sft.mean().detach()
    return losses, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    length_average: bool = False,
    global_num_pairs: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Inputs are per-sequence summed logprobs [P] (and token counts [P]). Returns (loss, metrics): the mean
    over pairs, or this micro-batch's share of the batch mean when `global_num_pairs` is given."""
    losses, metrics = dpo_pair_losses(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_num_tokens,
        rejected_num_tokens,
        beta,
        sft_weight,
        length_average,
    )
    denom = global_num_pairs if global_num_pairs is not None else max(losses.numel(), 1)
    return losses.sum() / denom, metrics


@register_policy_loss("dpo")
def dpo(
    logprobs: torch.Tensor,
    mb: Mapping[str, Any],
    beta: float = 0.1,
    sft_weight: float = 0.0,
    length_average: bool = False,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Micro-batch form: rows are interleaved pairs [chosen_0, rejected_0, chosen_1, ...] (pack them with
    keep_together=2); `mask` [2P, T] marks response tokens, `ref_lp` [2P, T] the reference's logprobs.
    Returns (sum of pair losses, number of pairs, metrics)."""
    mask = mb["mask"].float()
    if mask.shape[0] % 2:
        raise ValueError(f"dpo micro-batch needs an even number of rows (pairs), got {mask.shape[0]}")
    seq_lp = masked_sum(logprobs.float(), mask, dim=1)
    ref_lp = masked_sum(mb["ref_lp"].float(), mask, dim=1)
    tokens = mask.sum(dim=1)
    losses, metrics = dpo_pair_losses(
        seq_lp[0::2],
        seq_lp[1::2],
        ref_lp[0::2],
        ref_lp[1::2],
        tokens[0::2],
        tokens[1::2],
        beta,
        sft_weight,
        length_average,
    )
    return losses.sum(), torch.tensor(losses.numel()), metrics
