"""GSPO (group sequence policy optimisation): the importance ratio and its clip are per sequence.

s_i = exp(mean over the sequence's tokens of (logp - old_logp)), the length-normalised sequence ratio.
Per token we use s_it = sg(s_i) * exp(logp_t - sg(logp_t)): its value is s_i and its gradient is
s_i * grad(logp_t), so with "seq_mean" aggregation the objective and gradient equal the sequence-level
max(-A s_i, -A clip(s_i)) exactly, while token-level advantages [b, T] still work.
Because s_i is a geometric mean its spread is small: use much tighter clips than PPO's (the GSPO paper
used 3e-4 / 4e-4), set through grpo.clip_low / grpo.clip_high.
Truncated importance sampling, when on, uses the sequence-level weight min(exp(mean(old - engine)), cap).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_rl.algorithms.aggregation import masked_seq_mean
from megatron_rl.algorithms.losses import (
    Metrics,
    add_kl,
    check_pg_settings,
    clipped_surrogate,
    functional_loss,
    micro_batch_loss,
    per_token_advantages,
    tis_weights,
)
from megatron_rl.algorithms.registry import register_policy_loss


def gspo_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    engine_logprobs: torch.Tensor | None = None,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    loss_agg: str = "seq_mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    check_pg_settings(clip_low, clip_high, dual_clip, loss_agg, kl_coef, kl_estimator, tis_cap)
    lp, mask = logprobs.float(), mask.float()
    seq_log_ratio = masked_seq_mean(lp - old_logprobs.float(), mask)  # [b, 1]
    has = mask.sum(dim=1) > 0
    metrics: Metrics = {
        "ratio_mean": torch.exp(seq_log_ratio.squeeze(1))[has].mean().detach()
        if has.any()
        else torch.zeros(())
    }
    seq_w = tis_weights(old_logprobs, engine_logprobs, tis_cap, seq_mask=mask)
    if seq_w is not None:
        metrics["tis_mean"] = seq_w.squeeze(1)[has].mean() if has.any() else torch.zeros(())
    # Value s_i on every token, gradient s_i * d logp_t.
    log_s = seq_log_ratio.detach() + lp - lp.detach()
    adv = per_token_advantages(advantages, lp)
    per_token, _ = clipped_surrogate(lp, log_s, adv, mask, clip_low, clip_high, dual_clip, seq_w, metrics)
    per_token = add_kl(per_token, lp, ref_logprobs, mask, kl_coef, kl_estimator, metrics)
    return per_token, metrics


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    engine_logprobs: torch.Tensor | None = None,
    *,
    loss_agg: str = "seq_mean",
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    **settings: Any,
) -> tuple[torch.Tensor, Metrics]:
    """Functional GSPO loss: (loss, metrics), normalised like clipped_pg_loss."""
    return functional_loss(
        gspo_terms,
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


@register_policy_loss("gspo")
def gspo(
    logprobs: torch.Tensor, mb: Mapping[str, Any], loss_agg: str = "seq_mean", **settings: Any
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Micro-batch form of gspo_loss: (loss_sum, count, metrics)."""
    return micro_batch_loss(gspo_terms, logprobs, mb, loss_agg, settings)
