"""Turning per-token losses into one number, exactly, however the batch is split into micro-batches.

A micro-batch yields (sum, count): for "token_mean" the sum of masked per-token losses and the number of
masked tokens; for "seq_mean" the sum of per-sequence means and the number of sequences that have any
masked token. The batch loss is sum(sums) / sum(counts) over all micro-batches and data-parallel ranks.
Megatron does that division itself (calculate_per_token_loss); outside Megatron pass the global count as
`global_num_tokens` / `global_num_seqs` so each micro-batch's loss is its share of the batch mean and the
micro-batch losses (and gradients) add up to the batch's.
"""

from __future__ import annotations

import torch

from megatron_rl.errors import UserError

LOSS_AGGS = ("token_mean", "seq_mean")


def check_loss_agg(loss_agg: str) -> None:
    if loss_agg not in LOSS_AGGS:
        raise UserError(
            f"Unknown loss_agg {loss_agg!r} (grpo.loss_agg); choose one of {', '.join(LOSS_AGGS)}."
        )


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask > 0. `where` instead of `x * mask`: an inf/NaN at a padded position (e.g. an
    importance ratio of garbage logprobs) must not leak into the loss as inf * 0 = NaN."""
    picked = torch.where(mask > 0, x * mask, torch.zeros_like(x))
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, T] -> [b, 1]: the masked mean of each sequence."""
    return (masked_sum(x, mask, dim=1) / mask.sum(dim=1).clamp(min=1)).unsqueeze(1)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of this micro-batch; see the module docstring."""
    check_loss_agg(loss_agg)
    if loss_agg == "token_mean":
        return masked_sum(per_token, mask), mask.sum()
    tokens = mask.sum(dim=1)
    per_seq = masked_sum(per_token, mask, dim=1) / tokens.clamp(min=1)
    return per_seq.sum(), (tokens > 0).sum()


def normalize(
    loss_sum: torch.Tensor,
    count: torch.Tensor,
    loss_agg: str,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
) -> torch.Tensor:
    """loss_sum / the global count for `loss_agg` when given, else / this micro-batch's own count."""
    denom = global_num_tokens if loss_agg == "token_mean" else global_num_seqs
    if denom is None:
        denom = count.clamp(min=1)
    elif denom <= 0:
        raise ValueError(f"global normaliser for {loss_agg} must be positive, got {denom}")
    return loss_sum / denom
