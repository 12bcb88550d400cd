"""The decoupled PPO objective for off-policy (asynchronous) data: `grpo.loss=decoupled_pg`.

Three policies: the behaviour policy that sampled the tokens (the engine, possibly several weight versions
old: its logprobs `engine_lp`), the proximal policy the update is anchored to (the trainer's weights at
the start of this step: `old_lp`, recomputed by the trainer), and the policy being trained. The clipped
ratio is taken against the proximal policy, so the trust region is around weights the trainer holds, not
around stale ones; the behaviour weight pi_prox / pi_behav corrects for who sampled. A token whose
behaviour weight exceeds `tis_cap` gets no loss (it still counts in the normaliser): on stale data a few
tokens carry huge weights, and clamping them to the cap (clipped_pg's truncated IS) would keep their
biased gradient, masking them drops it. Per-token engine logprobs are those of the version that sampled
each token (a refit may land mid-response), so the weights are exact per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_rl.algorithms.aggregation import masked_mean
from megatron_rl.algorithms.losses import (
    Metrics,
    add_kl,
    check_pg_settings,
    clipped_surrogate,
    functional_loss,
    micro_batch_loss,
    per_token_advantages,
)
from megatron_rl.algorithms.registry import register_policy_loss


def behaviour_weights(
    proximal_logprobs: torch.Tensor, engine_logprobs: torch.Tensor | None, cap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, kept): pi_prox / pi_behav per token, detached, set to 0 where it exceeds `cap`."""
    if engine_logprobs is None:
        raise ValueError("decoupled_pg needs the engine's (behaviour) logprobs `engine_lp`")
    w = torch.exp(proximal_logprobs.float() - engine_logprobs.float()).detach()
    kept = w <= cap if cap is not None else torch.ones_like(w, dtype=torch.bool)
    return torch.where(kept, w, torch.zeros_like(w)), kept


def decoupled_pg_terms(
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
    """Per-token loss [b, T]: w_behav * max(-A r, -A clip(r)) with r = pi / pi_prox (+ KL)."""
    check_pg_settings(clip_low, clip_high, dual_clip, loss_agg, kl_coef, kl_estimator, tis_cap)
    lp, mask = logprobs.float(), mask.float()
    metrics: Metrics = {}
    weights, kept = behaviour_weights(old_logprobs, engine_logprobs, tis_cap)
    adv = per_token_advantages(advantages, lp)
    per_token, ratio = clipped_surrogate(
        lp, lp - old_logprobs.float(), adv, mask, clip_low, clip_high, dual_clip, weights, metrics
    )
    metrics["ratio_mean"] = masked_mean(ratio, mask).detach()
    metrics["behav_weight_mean"] = masked_mean(weights, mask * kept)
    metrics["behav_masked_fraction"] = masked_mean((~kept).float(), mask)
    per_token = add_kl(per_token, lp, ref_logprobs, mask, kl_coef, kl_estimator, metrics)
    return per_token, metrics


def decoupled_pg_loss(
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
    """Functional form (see losses.clipped_pg_loss for the normalisation)."""
    return functional_loss(
        decoupled_pg_terms, logprobs, old_logprobs, advantages, mask, ref_logprobs, engine_logprobs,
        loss_agg, global_num_tokens, global_num_seqs, settings,
    )  # fmt: skip


@register_policy_loss("decoupled_pg")
def decoupled_pg(
    logprobs: torch.Tensor, mb: Mapping[str, Any], loss_agg: str = "token_mean", **settings: Any
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Micro-batch form: (loss_sum, count, metrics)."""
    return micro_batch_loss(decoupled_pg_terms, logprobs, mb, loss_agg, settings)
