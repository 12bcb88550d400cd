"""The single-rank logprob kernel (whole vocabulary local) against autograd's log_softmax + gather."""

import pytest
import torch

from megatron_rl.policy.logprobs import token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_logprobs_and_grads_match_log_softmax(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 9, 64, generator=gen)).to(dtype).requires_grad_()
    ids = torch.randint(0, 64, (3, 9), generator=gen)
    weights = torch.randn(3, 8, generator=gen)

    got = token_logprobs(logits, ids)
    (got * weights).sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None

    want = torch.log_softmax(logits.float()[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (want * weights).sum().backward()

    assert got.shape == (3, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got_grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients round to 8 bits of mantissa
    torch.testing.assert_close(got_grad.float(), logits.grad.float(), atol=tol, rtol=0)
