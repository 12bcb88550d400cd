"""The CPU stand-ins for TE/apex kernels compute what Megatron's own code computes, and the heap setting
stops re-faulting freed memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_rl import platform

pytestmark = pytest.mark.skipif(not platform.use_cpu(), reason="CPU kernels are installed only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def _applied():
    platform.apply()


def _reference_swiglu(y: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(y, 2, -1)
    return F.silu(a) * b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_matches_the_unfused_formula(dtype):
    from megatron.core.fusions import fused_bias_swiglu as fbs

    torch.manual_seed(0)
    y = torch.randn(3, 5, 2 * 24, dtype=dtype)
    g = torch.randn(3, 5, 24, dtype=dtype)
    fused, ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    out = fbs.bias_swiglu_impl(fused, None)
    expected = _reference_swiglu(ref)
    out.backward(g)
    expected.backward(g)
    assert torch.equal(out, expected)
    assert torch.equal(fused.grad, ref.grad)  # same kernels (silu, silu_backward, mul): bit-identical


def test_probability_weighted_swiglu_matches_the_unfused_formula():
    from megatron.core.fusions import fused_bias_swiglu as fbs

    torch.manual_seed(1)
    y = torch.randn(7, 2 * 16)
    w = torch.rand(7, 1)
    g = torch.randn(7, 16)
    fused, ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    out = fbs.weighted_bias_swiglu_impl(fused, None, w)
    expected = _reference_swiglu(ref) * w
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.grad, ref.grad, rtol=0, atol=1e-6)


def _reference_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(x, 2, -1)
    rotated = x * freqs.cos() + torch.cat((-x2, x1), -1) * freqs.sin()
    return torch.cat((rotated, rest), -1)


@pytest.mark.parametrize("rot_dim", [64, 32], ids=["full", "partial"])
def test_rotary_embedding_matches_rotate_half_formula(rot_dim):
    from megatron.core.models.common.embeddings import rope_utils

    torch.manual_seed(2)
    t = torch.randn(16, 2, 3, 64)
    half = torch.randn(16, 1, 1, rot_dim // 2)
    freqs = torch.cat((half, half), -1)
    g = torch.randn(16, 2, 3, 64)
    ours, ref = t.clone().requires_grad_(), t.clone().requires_grad_()
    out = rope_utils._apply_rotary_pos_emb_bshd(ours, freqs)
    expected = _reference_rope(ref, freqs)
    out.backward(g)
    expected.backward(g)
    # One rounding less than the formula (fused multiply-add): within 2 ulp at these magnitudes.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-6)
    assert out.is_contiguous()


_FREE = """
import json, torch
from megatron_rl.platform import cpu_kernels
cpu_kernels.keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(50 << 20)  # 200 MiB, over glibc's largest mmap threshold
held = rss()
del x
print(json.dumps((held - rss()) / 2**20))
"""


@pytest.mark.parametrize("env, kept", [({}, True), ({"MALLOC_MMAP_MAX_": "65536"}, False)])
def test_freed_memory_stays_mapped_for_the_next_step(env, kept):
    """A freed 200 MiB tensor stays in the heap for the next step to reuse (glibc's default unmaps it, and
    the next step first-touches 51k fresh pages), unless the user configured glibc's malloc, which is then
    left alone."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    child_env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _FREE], env=child_env, capture_output=True, text=True, check=True
    )
    released_mib = json.loads(out.stdout.strip().splitlines()[-1])
    if kept:
        assert released_mib < 1, released_mib
    else:
        assert released_mib > 190, released_mib
