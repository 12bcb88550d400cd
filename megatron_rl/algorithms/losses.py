"""Policy-gradient and SFT losses.

Two forms of each loss:
- a functional form on tensors, `clipped_pg_loss(logprobs, old_logprobs, advantages, mask, ...)` ->
  (loss, metrics), normalised by the global token/sequence count when given (see aggregation.py);
- a registered micro-batch form, `clipped_pg(logprobs, mb, **settings)` -> (loss_sum, count, metrics),
  which is what the Megatron policy calls (Megatron divides by the global count itself).

Micro-batch fields (per-token ones aligned with the logprobs: position t scores token t+1): `mask` [b, T]
(1 on tokens that get a loss), `adv` [b] or [b, T], `old_lp` (the policy before this update), optional
`engine_lp` (the generator's logprobs) and `ref_lp` (the reference policy's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from megatron_rl.algorithms.aggregation import (
    aggregate,
    check_loss_agg,
    masked_mean,
    masked_seq_mean,
    normalize,
)
from megatron_rl.algorithms.kl import KL_ESTIMATORS, kl_penalty
from megatron_rl.algorithms.registry import register_policy_loss
from megatron_rl.errors import UserError

Metrics = dict[str, torch.Tensor]


def check_pg_settings(
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    loss_agg: str,
    kl_coef: float,
    kl_estimator: str,
    tis_cap: float | None,
) -> None:
    """UserError naming the grpo.* key of the first setting that cannot work."""
    check_loss_agg(loss_agg)
    if not 0.0 <= clip_low < 1.0:
        raise UserError(
            f"grpo.clip_low must be in [0, 1) (ratio lower bound 1 - clip_low > 0), got {clip_low}."
        )
    if clip_high < 0.0:
        raise UserError(f"grpo.clip_high must be >= 0, got {clip_high}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise UserError(
            f"grpo.dual_clip must be null or > 1 (it bounds -A * ratio by -A * c), got {dual_clip}."
        )
    if kl_coef < 0.0:
        raise UserError(f"grpo.kl_coef must be >= 0, got {kl_coef}.")
    if kl_estimator not in KL_ESTIMATORS:
        raise UserError(
            f"Unknown grpo.kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}."
        )
    if tis_cap is not None and tis_cap <= 0.0:
        raise UserError(f"grpo.tis_cap must be null or > 0, got {tis_cap}.")


def per_token_advantages(adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    adv = adv.to(like.dtype)
    return adv.unsqueeze(1) if adv.dim() == 1 else adv


def tis_weights(
    old_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor | None,
    tis_cap: float | None,
    seq_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """min(pi_old / pi_engine, cap), detached: re-weights tokens sampled by the engine (vLLM) as if sampled
    by the training policy, truncated so rare large ratios cannot blow up the variance. With `seq_mask`, one
    weight per sequence [b, 1] from its mean log-ratio over the masked tokens (GSPO's sequence level)."""
    if tis_cap is None:
        return None
    if engine_logprobs is None:
        raise ValueError("tis_cap is set but the batch has no engine (generation) logprobs `engine_lp`")
    log_w = old_logprobs.float() - engine_logprobs.float()
    if seq_mask is not None:
        log_w = masked_seq_mean(log_w, seq_mask)
    return torch.exp(log_w).clamp(max=tis_cap).detach()


def add_kl(
    per_token: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
    metrics: Metrics,
) -> torch.Tensor:
    if not kl_coef:
        return per_token
    if ref_logprobs is None:
        raise ValueError("kl_coef > 0 but the batch has no reference logprobs `ref_lp`")
    # Outside the mask the reference is replaced by the policy itself (KL 0): padded positions hold
    # arbitrary logprobs whose exp() could overflow and poison gradients through the mask.
    ref = torch.where(mask > 0, ref_logprobs.float(), logprobs.detach())
    kl = kl_penalty(logprobs, ref, kl_estimator)
    metrics["kl"] = masked_mean(kl, mask).detach()
    return per_token + kl_coef * kl


def clipped_surrogate(
    lp: torch.Tensor,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    is_weights: torch.Tensor | None,
    metrics: Metrics,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(log_ratio), then the dual
    clip and the (detached) importance weights. Shared by token-level PPO/GRPO and sequence-level GSPO.
    Returns (per-token loss, r)."""
    # Log-ratio 0 outside the mask, so padding can never overflow exp() (inf there would make NaN grads).
    ratio = torch.exp(torch.where(mask > 0, log_ratio, torch.zeros_like(lp)))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    # Tokens whose gradient the clip removed (the clipped branch is strictly larger).
    metrics["clip_fraction"] = masked_mean((clipped > unclipped).float(), mask).detach()
    if dual_clip is not None:
        # A < 0 with a huge ratio: -A * ratio is unbounded; cap it at -A * c (Ye et al., dual-clip PPO).
        bound = -adv * dual_clip
        capped = (adv < 0) & (per_token > bound)
        per_token = torch.where(capped, bound, per_token)
        metrics["dual_clip_fraction"] = masked_mean(capped.float(), mask).detach()
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics["pg_loss"] = masked_mean(per_token, mask).detach()
    return per_token, ratio


def clipped_pg_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    engine_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token loss [b, T] of the clipped surrogate (+ KL), and micro-batch metrics."""
    check_pg_settings(clip_low, clip_high, dual_clip, loss_agg, kl_coef, kl_estimator, tis_cap)
    lp, mask = logprobs.float(), mask.float()
    metrics: Metrics = {}
    weights = tis_weights(old_logprobs, engine_logprobs, tis_cap)
    adv = per_token_advantages(advantages, lp)
    per_token, ratio = clipped_surrogate(
        lp, lp - old_logprobs.float(), adv, mask, clip_low, clip_high, dual_clip, weights, metrics
    )
    metrics["ratio_mean"] = masked_mean(ratio, mask).detach()
    if weights is not None:
        metrics["tis_mean"] = masked_mean(weights, mask)
        metrics["tis_clip_fraction"] = masked_mean((weights >= tis_cap).float(), mask)
    per_token = add_kl(per_token, lp, ref_logprobs, mask, kl_coef, kl_estimator, metrics)
    return per_token, metrics


Terms = Callable[..., tuple[torch.Tensor, Metrics]]


def functional_loss(
    terms: Terms,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    engine_logprobs: torch.Tensor | None,
    loss_agg: str,
    global_num_tokens: float | None,
    global_num_seqs: float | None,
    settings: dict[str, Any],
) -> tuple[torch.Tensor, Metrics]:
    """(loss, metrics) of a per-token `terms` function, normalised by the global counts when given."""
    per_token, metrics = terms(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, engine_logprobs, loss_agg=loss_agg, **settings
    )
    loss_sum, count = aggregate(per_token, mask.float(), loss_agg)
    return normalize(loss_sum, count, loss_agg, global_num_tokens, global_num_seqs), metrics


def micro_batch_loss(
    terms: Terms, logprobs: torch.Tensor, mb: Mapping[str, Any], loss_agg: str, settings: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """(loss_sum, count, metrics) of a per-token `terms` function on a policy micro-batch."""
    per_token, metrics = terms(
        logprobs,
        mb["old_lp"],
        mb["adv"],
        mb["mask"],
        mb.get("ref_lp"),
        mb.get("engine_lp"),
        loss_agg=loss_agg,
        **settings,
    )
    loss_sum, count = aggregate(per_token, mb["mask"].float(), loss_agg)
    return loss_sum, count, metrics


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    engine_logprobs: torch.Tensor | None = None,
    *,
    loss_agg: str = "token_mean",
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    **settings: Any,
) -> tuple[torch.Tensor, Metrics]:
    """PPO/GRPO clipped surrogate: per token max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with
    r = exp(logprobs - old_logprobs); optional dual clip, truncated importance sampling and KL penalty
    (settings: clip_low, clip_high, dual_clip, kl_coef, kl_estimator, tis_cap; see clipped_pg_terms).
    Returns (loss, metrics); `loss` is this micro-batch's share of the global mean when the global
    counts are given, else its own mean."""
    return functional_loss(
        clipped_pg_terms,
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        engine_logprobs,
        loss_agg,
        global_num_tokens,
        global_num_seqs,
        settings,
    )


@register_policy_loss("clipped_pg")
def clipped_pg(
    logprobs: torch.Tensor, mb: Mapping[str, Any], loss_agg: str = "token_mean", **settings: Any
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Micro-batch form of clipped_pg_loss: (loss_sum, count, metrics)."""
    return micro_batch_loss(clipped_pg_terms, logprobs, mb, loss_agg, settings)


def sft_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg: str = "token_mean",
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Masked negative log-likelihood (mask = 1 on response/assistant tokens)."""
    mask = mask.float()
    loss_sum, count = aggregate(-logprobs.float(), mask, loss_agg)
    nll = masked_mean(-logprobs.float(), mask).detach()
    return normalize(loss_sum, count, loss_agg, global_num_tokens, global_num_seqs), {
        "nll": nll,
        "num_tokens": mask.sum().detach(),
    }


@register_policy_loss("nll")
def nll(
    logprobs: torch.Tensor, mb: Mapping[str, Any], loss_agg: str = "token_mean", **_: Any
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Micro-batch form of sft_loss. Ignores RL settings so an SFT run can share the GRPO loss config."""
    mask = mb["mask"].float()
    loss_sum, count = aggregate(-logprobs.float(), mask, loss_agg)
    return loss_sum, count, {"nll": masked_mean(-logprobs.float(), mask).detach()}
