"""The registered "dpo" loss (megatron_rl.algorithms.dpo) with metrics that are exact over a whole batch.

The registered loss reports per-micro-batch means; the policy averages those over micro-batches, which
weighs a micro-batch of 1 pair like one of 20. Here each mean is multiplied back by its micro-batch's
pair count into a sum (keys starting with "_", which the policy adds up over micro-batches and
data-parallel ranks), and `summarize` divides by the total pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.algorithms.aggregation import masked_sum
from megatron_rl.algorithms.registry import get_policy_loss

_PREFIX = "_dpo/"
# Per-pair means the registered loss reports, and the names they are logged under.
NAMES = {
    "accuracy": "accuracy",
    "policy_accuracy": "policy_accuracy",
    "chosen_reward": "rewards/chosen",
    "rejected_reward": "rewards/rejected",
    "margin": "rewards/margin",
    "dpo_loss": "dpo_loss",
    "sft_nll": "sft_nll",
}
SUM_KEYS = (f"{_PREFIX}pairs", *(f"{_PREFIX}{k}" for k in NAMES))


def dpo_with_sums(
    logprobs: torch.Tensor, mb: dict[str, Any], **settings: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    loss_sum, pairs, metrics = get_policy_loss("dpo")(logprobs, mb, **settings)
    n = torch.as_tensor(pairs, dtype=torch.float32)
    # Does the policy itself (not relative to the reference) score chosen above rejected?
    seq = masked_sum(logprobs.detach().float(), mb["mask"].float(), dim=1)
    metrics = {**metrics, "policy_accuracy": (seq[0::2] > seq[1::2]).float().mean()}
    sums = {f"{_PREFIX}{k}": v.detach().float() * n for k, v in metrics.items() if k in NAMES}
    sums[f"{_PREFIX}pairs"] = n
    return loss_sum, pairs, sums


def summarize(metrics: dict[str, float]) -> dict[str, float]:
    """Batch sums -> per-pair means under their logged names; other metrics pass through."""
    out = {k: v for k, v in metrics.items() if not k.startswith(_PREFIX)}
    pairs = metrics.get(f"{_PREFIX}pairs", 0.0)
    if pairs:
        out["pairs"] = pairs
        for key, name in NAMES.items():
            if f"{_PREFIX}{key}" in metrics:
                out[name] = metrics[f"{_PREFIX}{key}"] / pairs
    return out
