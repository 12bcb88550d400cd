"""Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman's k1 / k3)."""

from __future__ import annotations

import torch

from megatron_rl.errors import UserError

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """k1 = logp - ref (unbiased, can be negative per token);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise UserError(f"Unknown grpo.kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}.")
