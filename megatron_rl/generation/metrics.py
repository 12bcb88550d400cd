"""Generation/training mismatch metrics: how far the engine's logprobs are from the policy's."""

from __future__ import annotations

import torch


def token_mult_prob_error(
    policy_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor
) -> float:
    """Mean over generated tokens (mask == 1) of exp(|logp_policy - logp_engine|). 1.0 means the engine
    samples from exactly the distribution the policy trains on; 1.01 means tokens are on average 1% more
    or less likely under one than under the other."""
    if policy_logprobs.shape != engine_logprobs.shape or policy_logprobs.shape != mask.shape:
        raise ValueError(
            f"token_mult_prob_error: shapes differ (policy {tuple(policy_logprobs.shape)}, "
            f"engine {tuple(engine_logprobs.shape)}, mask {tuple(mask.shape)})"
        )
    diff = _masked_abs_diff(policy_logprobs, engine_logprobs, mask)
    keep = mask.to(torch.float64)
    return float((torch.exp(diff) * keep).sum() / keep.sum().clamp(min=1.0))


def _masked_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Masked positions may hold anything (prompt, padding, -inf): replace them, never multiply (inf * 0).
    diff = (a.to(torch.float64) - b.to(torch.float64)).abs()
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))
