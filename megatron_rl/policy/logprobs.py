"""Per-token log-probabilities from vocab-parallel logits, without ever gathering the full vocabulary.

Each TP rank holds logits for a slice of the vocabulary. The log-softmax needs only two all-reduces of
[b, s] tensors (max and sum of exponentials) and one for the target logit, so memory stays O(b*s*V/tp).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group) -> torch.Tensor:  # type: ignore[override]
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        local_vocab = logits.shape[-1]
        logits_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        in_range = (target >= vocab_start) & (target < vocab_start + local_vocab)
        local_target = (target - vocab_start).clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * in_range
        if group is not None:
            # One collective for both sums: they are reduced over the same group.
            packed = torch.stack([sum_exp, target_logit])
            dist.all_reduce(packed, group=group)
            sum_exp, target_logit = packed[0], packed[1]
        logprob = target_logit - sum_exp.log()
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_range)
        return logprob

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        softmax, local_target, in_range = ctx.saved_tensors
        # d logp(t) / d logit_j = 1[j == t] - softmax_j
        grad = softmax * -grad_out.unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (grad_out * in_range).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


class _LocalLogprob(torch.autograd.Function):
    """log_softmax(logits)[target] with the whole vocabulary local. Autograd's version keeps the full
    log-softmax, then builds a zero [.., V] gradient, scatters into it and runs the log-softmax backward:
    three full-vocab passes and an allocation. Here the backward reuses the saved log-softmax in place:
    grad = onehot(target) * g - softmax * g (measured on SmolLM2, 1024 tokens x 49152 vocab, CPU: 0.74 s
    -> 0.2 s for forward + backward)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.input_dtype = logits.dtype
        log_softmax = torch.log_softmax(logits.float(), dim=-1)
        ctx.save_for_backward(log_softmax, target)
        return log_softmax.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        log_softmax, target = ctx.saved_tensors
        grad = log_softmax.exp_()  # the saved tensor is not needed again: reuse its memory
        grad.mul_(-grad_out.unsqueeze(-1))
        grad.scatter_add_(-1, target.unsqueeze(-1), grad_out.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log softmax(logits)[target] where `logits` [..., V/tp] is this rank's vocab slice.

    `tp_group=None` means no tensor parallelism (the full vocabulary is local). Returns fp32 [...].
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    if tp_group is None:
        return _LocalLogprob.apply(logits, target)
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    vocab_start = rank * logits.shape[-1]
    return _VocabParallelLogprob.apply(logits, target, vocab_start, tp_group)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Logprob of each next token: position t scores input_ids[t+1]. Returns [b, s-1]."""
    # Score every position (the last against a dummy target) and drop it afterwards: slicing the logits
    # instead would copy the whole [b, s, V] tensor to make it contiguous.
    target = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
    return vocab_parallel_logprobs(logits, target, tp_group)[:, :-1]
