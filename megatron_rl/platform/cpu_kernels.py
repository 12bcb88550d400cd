"""CPU stand-ins for the kernels Transformer Engine and apex give Megatron Core on GPU.

Each replaces a slow fallback Megatron takes when neither is installed, computes the same numbers (RoPE to
rounding: one fused multiply-add), and says which cost it removes; what each saved is in docs/policy.md
(`python -m megatron_rl.bench train`).
`install()` applies them; `megatron_rl.platform.apply()` calls it on CPU only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


def install() -> None:
    keep_freed_memory()
    _use_fused_cpu_adam()
    _foreach_grad_clipping()
    _provide_wgrad_accumulation_kernel()
    _provide_dummy_wgrad()
    _eager_swiglu_fusion()
    _rotary_without_copies()


def keep_freed_memory() -> None:
    # torch's CPU tensors come straight from glibc malloc, which serves requests over its mmap threshold
    # (at most 32 MiB: logits, the embedding and its gradient) with fresh mappings and trims freed heap back
    # to the OS, so every training step first-touches gigabytes of new pages, and the page faults and kernel
    # time were a large part of a step. Serving everything from a heap that is never trimmed keeps the memory
    # mapped from one step to the next, and RSS stays near the step's peak (flat over steps of varying
    # length), as with a GPU caching allocator.
    # Left alone where the user set glibc's own MALLOC_* or GLIBC_TUNABLES, or libc is not glibc.
    import ctypes
    import os

    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def _foreach_grad_clipping() -> None:
    # Without TE or apex, Megatron's gradient clipping falls back to Python loops: a norm per tensor, and a
    # scale that computes `src * scale` into a temporary as big as each gradient before copying it back
    # (also the optimizer's fp32 <-> bf16 copies). torch's multi-tensor (foreach) CPU kernels do each in one
    # call, the scale in place.
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:
        return

    def l2_norm(
        chunk_size: int, noop: Any, tensor_lists: list[list[torch.Tensor]], per_tensor: bool, *args: Any
    ):
        norms = torch._foreach_norm(tensor_lists[0]) if tensor_lists[0] else [torch.zeros(())]
        return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None

    def scale(chunk_size: int, noop: Any, tensor_lists: list[list[torch.Tensor]], factor: float) -> None:
        src, dst = tensor_lists
        if any(a is not b for a, b in zip(src, dst)):
            torch._foreach_copy_(dst, src)
        if factor != 1.0:
            torch._foreach_mul_(dst, factor)

    from megatron.core.optimizer import optimizer

    clip_grads.l2_norm_impl = l2_norm
    clip_grads.multi_tensor_scale_impl = optimizer.multi_tensor_scale_impl = scale


class _CpuWgradAccumulation:
    """The CPU equivalent of apex's `fused_weight_gradient_mlp_cuda`: main_grad += grad_output^T @ input."""

    @staticmethod
    def wgrad_gemm_accum_fp32(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        if total_input.dtype != main_grad.dtype:  # bf16/fp16 training: accumulate in fp32, as apex does
            total_input, grad_output = total_input.to(main_grad.dtype), grad_output.to(main_grad.dtype)
        main_grad.addmm_(grad_output.t(), total_input)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _provide_wgrad_accumulation_kernel() -> None:
    # With gradient_accumulation_fusion, a linear layer's backward computes its weight gradient straight
    # into the DDP main_grad buffer. Without it, every weight gets a freshly allocated gradient that a hook
    # then adds to the buffer: one more weight-sized write and read per layer, into new memory each step.
    # The fusion needs apex's CUDA kernel; on CPU it is one addmm.
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = _CpuWgradAccumulation
    layers._grad_accum_fusion_available = True


def _dummy_wgrad(shape: list[int], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    if zero:  # a broadcast zero: the engine adds it to the embedding's gradient without a [V, h] buffer
        return torch.zeros((), dtype=dtype).expand(shape)
    return torch.empty(shape, dtype=dtype)  # never read: the DDP hook drops it, the engine steals it


def _provide_dummy_wgrad() -> None:
    # With the fusion on, a linear layer still returns a placeholder weight gradient. For a tied
    # embedding/output weight it must be zeros (it is summed with the embedding's real gradient), and without
    # TE Megatron allocates and fills a fresh [vocab, hidden] zero tensor for it every step, on fresh pages.
    # TE's get_dummy_wgrad shares one buffer; `_dummy_wgrad` is that helper
    # for CPU, and layers.py calls it only when its HAVE_TE flag is set. The flag's other uses there are
    # assertions for CPU activation offloading, which this project never turns on.
    from megatron.core.tensor_parallel import layers

    layers.get_dummy_wgrad = _dummy_wgrad
    layers.HAVE_TE = True


class _FusedAdamTorch:
    """`torch` as megatron.core.optimizer sees it, but with torch's fused CPU Adam/AdamW."""

    class optim:  # noqa: N801 - stands in for the torch.optim module
        Adam = functools.partial(torch.optim.Adam, fused=True)
        AdamW = functools.partial(torch.optim.AdamW, fused=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _use_fused_cpu_adam() -> None:
    # Without Transformer Engine or Apex, Megatron builds torch.optim.AdamW with its defaults, which on
    # CPU is the per-parameter Python loop (a visible share of a train step). torch's fused CPU kernel does
    # the same update in one pass per tensor.
    from megatron.core import optimizer as mcore_optimizer

    if getattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False) and mcore_optimizer.torch is torch:
        mcore_optimizer.torch = _FusedAdamTorch()


def _swiglu_back(g: torch.Tensor, y: torch.Tensor, *, _megatron_back: Any) -> torch.Tensor:
    """d/dy of silu(y_1) * y_2, written into the two halves of one buffer (Megatron's eager formula takes
    seven element-wise passes and a concatenation)."""
    if g.dtype != y.dtype:  # the probability-weighted MoE path promotes g to fp32: keep Megatron's math
        return _megatron_back(g, y)
    y_1, y_2 = torch.chunk(y, 2, -1)
    grad = torch.empty_like(y, memory_format=torch.contiguous_format)
    grad_1, grad_2 = torch.chunk(grad, 2, -1)
    torch.mul(g, F.silu(y_1), out=grad_2)
    torch.ops.aten.silu_backward.grad_input(g * y_2, y_1, grad_input=grad_1)
    return grad


def _eager_swiglu_fusion() -> None:
    # Megatron's unfused SwiGLU chunks fc1's output, adds a zero offset to one half (a fresh copy), and its
    # backward concatenates the halves' gradients into another fresh [tokens, 2 * ffn] tensor. Its fused path
    # (bias_activation_fusion) saves only the input and returns one gradient buffer, but its kernels are
    # torch.compile'd, which on CPU compiles C++ per shape. These eager kernels make that path usable here:
    # two fewer activation-sized copies per layer, and half the memory the activation keeps for its backward.
    from megatron.core.fusions import fused_bias_swiglu as fbs

    names = (
        "swiglu",
        "bias_swiglu",
        "weighted_swiglu",
        "swiglu_back",
        "bias_swiglu_back",
        "weighted_swiglu_back",
    )
    for name in names:
        compiled = getattr(fbs, name)
        setattr(fbs, name, getattr(compiled, "__wrapped__", compiled))  # call the Python source, uncompiled
    fbs.swiglu_back = functools.partial(_swiglu_back, _megatron_back=fbs.swiglu_back)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """[x1, x2] -> [x1 cos1 - x2 sin1, x2 cos2 + x1 sin2] (the transpose when `inverse`), one output buffer."""
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, c2, out=o2)
    if inverse:
        o1.addcmul_(x2, s2)
        o2.addcmul_(x1, s1, value=-1)
    else:
        o1.addcmul_(x2, s1, value=-1)
        o2.addcmul_(x1, s2)
    return out


class _RotaryHalf(torch.autograd.Function):
    """Rotary embedding, rotate-half convention; the backward is the inverse rotation."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def _rotary_without_copies() -> None:
    # Megatron's unfused RoPE builds rotate_half(t) by negating and concatenating halves, then concatenates
    # the result with an empty pass-through slice; the backward of the chunk concatenates once more. These
    # kernels make none of those copies, like TE's fused RoPE on GPU. Partial,
    # interleaved and MLA rotary keep Megatron's code.
    from megatron.core.models.common.embeddings import rope_utils

    megatron_bshd = rope_utils._apply_rotary_pos_emb_bshd

    def apply_bshd(
        t: torch.Tensor,
        freqs: torch.Tensor,
        rotary_interleaved: bool = False,
        multi_latent_attention: bool = False,
        mscale: float = 1.0,
    ) -> torch.Tensor:
        if rotary_interleaved or multi_latent_attention or freqs.shape[-1] != t.shape[-1]:
            return megatron_bshd(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        cos = (torch.cos(freqs) * mscale).to(t.dtype)
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        return _RotaryHalf.apply(t, cos, sin)

    rope_utils._apply_rotary_pos_emb_bshd = apply_bshd
