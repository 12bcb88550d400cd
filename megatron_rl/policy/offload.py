"""Megatron's training-only state out of device memory while colocated vLLM engines generate.

`policy.offload_during_generation` (megatron_rl/colocation.py derives it): "optimizer" moves the optimizer's
state (Adam moments, and the fp32 main copy of bf16 weights that Megatron's mixed-precision and distributed
optimizers keep) to host memory and frees the device storage; "optimizer_and_grads" also frees the DDP
gradient buffers. `onload` brings everything back before the next train step.

The code works on storages, not on tensors: a storage is copied whole into a host buffer and resized to
zero bytes, and later resized back and refilled. Every tensor that views it (a parameter's `main_grad` in
the grad buffer, an optimizer shard) stays the same Python object, with the same storage, offset and
strides, so nothing that holds a reference needs to know. The path knows no platform: on CPU it runs the
same way (a host copy of host memory), which is how the tests prove the round trip bit-exact. The host
buffers are pinned when the storage lives on an accelerator (faster copies, and the copy back can be
asynchronous with the next ones).

Gradients are not copied: the train step zeroes the grad buffers before its first backward, so their
content after a step is never read again; they are freed and re-allocated as zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

CHOICES = ("none", "optimizer", "optimizer_and_grads")


@dataclass
class _Held:
    storage: torch.UntypedStorage
    device: torch.device
    nbytes: int
    host: torch.Tensor | None  # None: freed without a copy (refilled with zeros)


def _storage_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """The whole storage as one uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def inner_optimizers(optimizer: Any) -> Iterator[Any]:
    """The torch optimizers inside a Megatron optimizer (a ChainedOptimizer holds several)."""
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        yield part.optimizer


def optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """What the optimizer keeps beside the model: its state (moments, steps) and the tensors it updates,
    which are fp32 main copies unless the model's own parameters are trained in place (filtered out by
    the caller, which knows the model's storages)."""
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def grad_buffers(chunks: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The DDP-wrapped chunks' contiguous gradient buffers (every parameter's `main_grad` views one)."""
    for chunk in chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if getattr(buf, "grad_data", None) is not None:
                yield buf.grad_data


class Offloader:
    """Frees and restores the storages of one policy rank's optimizer state and grad buffers."""

    def __init__(self, model_params: Iterable[torch.Tensor]) -> None:
        # Storages the model computes with (its parameters, Megatron's param buffers) are never freed: the
        # refit exports them and the logprob forward reads them while the engines generate.
        self._keep = {p.untyped_storage().data_ptr() for p in model_params}
        self._held: list[_Held] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._held)

    def offload(self, optimizer: Any, chunks: list[Any], what: str) -> int:
        """Frees what `what` names (CHOICES); returns the device bytes freed."""
        if what not in CHOICES:
            raise ValueError(f"offload {what!r} is not one of {', '.join(CHOICES)}")
        if self._held:
            raise RuntimeError("offload while the state is already offloaded (onload first)")
        if what == "none":
            return 0
        if what == "optimizer_and_grads":
            optimizer.zero_grad()  # main grads that are not views of the buffers are dropped here
            self._free(grad_buffers(chunks), copy=False)
        self._free(optimizer_tensors(optimizer), copy=True)
        return sum(h.nbytes for h in self._held)

    def _free(self, tensors: Iterable[torch.Tensor], copy: bool) -> None:
        seen = self._keep | {h.storage.data_ptr() for h in self._held}
        freeing = []
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() == 0 or ptr in seen:
                continue
            seen.add(ptr)
            host = None
            if copy:
                pin = t.device.type != "cpu"
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
                host.copy_(_storage_view(storage, t.device), non_blocking=pin)
            freeing.append(_Held(storage, t.device, storage.nbytes(), host))
        if any(h.device.type == "cuda" for h in freeing):
            torch.cuda.synchronize()  # the host copies must be complete before their source is freed
        for h in freeing:
            h.storage.resize_(0)
        self._held += freeing

    def onload(self) -> int:
        """Restores every freed storage (the same bytes; grads as zeros); returns the bytes restored."""
        restored = 0
        for h in self._held:
            h.storage.resize_(h.nbytes)
            view = _storage_view(h.storage, h.device)
            if h.host is None:
                view.zero_()
            else:
                view.copy_(h.host, non_blocking=h.device.type != "cpu")
            restored += h.nbytes
        if any(h.device.type == "cuda" for h in self._held):
            torch.cuda.synchronize()  # the pinned buffers are released when this returns
        self._held = []
        return restored
