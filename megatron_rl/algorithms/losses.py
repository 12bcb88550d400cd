"""Policy losses. Each maps (logprobs [b, T], micro_batch, **settings) -> (loss_sum, count, metrics).

Micro-batch fields (aligned with logprobs: position t scores token t+1): `mask` (1 on response tokens),
`adv` [b], `old_lp` (policy logprobs before this update), optional `engine_lp` (the generator's) and
`ref_lp` (reference policy). The policy divides summed gradients by the global `count`, so "token_mean"
(count = tokens) and "seq_mean" (count = sequences) are exact over the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.algorithms.registry import register_policy_loss


def kl_penalty(logprobs: torch.Tensor, ref_lp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from samples of pi: k1 = log(pi/ref); k3 = r - log r - 1, r = ref/pi."""
    log_ratio = logprobs - ref_lp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if loss_agg == "token_mean":
        return (per_token * mask).sum(), mask.sum()
    if loss_agg == "seq_mean":
        tokens = mask.sum(dim=1)
        has = tokens > 0
        per_seq = (per_token * mask).sum(dim=1) / tokens.clamp(min=1)
        return per_seq[has].sum(), has.sum()
    raise ValueError(f"unknown loss_agg {loss_agg!r} (token_mean or seq_mean)")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@register_policy_loss("clipped_pg")
def clipped_pg(
    logprobs: torch.Tensor,
    mb: dict[str, Any],
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate with clip-higher (separate low/high), optional dual clip for negative
    advantages, truncated importance sampling against the generator's logprobs, and a KL penalty."""
    mask = mb["mask"].to(logprobs.dtype)
    adv = mb["adv"].to(logprobs.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(logprobs - mb["old_lp"])
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_frac = _masked_mean((clipped > unclipped).float(), mask)
    if dual_clip is not None:
        # For A < 0 a huge ratio would make the loss unbounded; cap it at -A * c (c > 1).
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    metrics = {"clip_fraction": clip_frac.detach(), "ratio_mean": _masked_mean(ratio, mask).detach()}
    if tis_cap is not None and "engine_lp" in mb:
        weight = torch.exp(mb["old_lp"] - mb["engine_lp"]).clamp(max=tis_cap).detach()
        per_token = per_token * weight
        metrics["tis_weight_mean"] = _masked_mean(weight, mask)
    metrics["pg_loss"] = _masked_mean(per_token, mask).detach()
    if kl_coef and "ref_lp" in mb:
        kl = kl_penalty(logprobs, mb["ref_lp"], kl_estimator)
        per_token = per_token + kl_coef * kl
        metrics["kl"] = _masked_mean(kl, mask).detach()
    loss_sum, count = aggregate(per_token, mask, loss_agg)
    return loss_sum, count, metrics


@register_policy_loss("nll")
def nll(logprobs: torch.Tensor, mb: dict[str, Any], loss_agg: str = "token_mean", **_: Any):
    """Supervised fine-tuning: negative log-likelihood of the masked (response) tokens."""
    mask = mb["mask"].to(logprobs.dtype)
    loss_sum, count = aggregate(-logprobs, mask, loss_agg)
    return loss_sum, count, {"nll": _masked_mean(-logprobs, mask).detach()}
