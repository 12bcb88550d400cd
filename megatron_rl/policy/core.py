"""The Megatron policy on one rank: logprobs, a train step through Megatron's pipeline schedules, weights.

Micro-batches are dicts holding `input_ids` [b, s] plus whatever the loss needs. A loss function maps
(logprobs [b, s-1], micro_batch) -> (loss_sum, count, metrics); Megatron divides the summed gradients by
the total count over micro-batches and data-parallel ranks, so token-mean (count = tokens) and
sequence-mean (count = sequences) losses are exact whatever the packing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl import platform
from megatron_rl.models.builder import build_model_with_config
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.optim import OptimConfig, build_optimizer, wrap_ddp
from megatron_rl.policy.router_replay import ReplayState

LossFn = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, Any, dict[str, torch.Tensor]]]


class MegatronPolicy:
    """Model chunks + DDP + optimizer + LR schedule for this rank (after distributed.initialize)."""

    def __init__(
        self,
        hf_config: dict[str, Any],
        parallel: ParallelConfig,
        optim: Any | None = None,
        dtype: torch.dtype = torch.float32,
        train: bool = True,
        router_replay: str = "off",
    ) -> None:
        """`router_replay` (MoE): "engine" replays micro-batches' `routing` in every forward, "measure" only
        counts how often the routers agree with it, "off" ignores it (policy/router_replay.py)."""
        from megatron.core import parallel_state

        self.parallel = parallel
        self.dtype = dtype
        overrides: dict[str, Any] = {"calculate_per_token_loss": True}
        if parallel.pp > 1:
            # Micro-batches are packed by token budget, so their shapes differ; p2p sends shapes first.
            overrides["variable_seq_lengths"] = True
        if router_replay != "off":
            overrides["moe_enable_routing_replay"] = True
        chunks, self.config, self.arch = build_model_with_config(hf_config, parallel, dtype, **overrides)
        self.replay = (
            ReplayState(chunks, router_replay, parallel.sequence_parallel) if router_replay != "off" else None
        )
        self.optimizer = self.scheduler = None
        if train:
            optim = optim or OptimConfig()
            # The distributed optimizer shards state over data-parallel ranks; with one it is pure overhead.
            sharded = (
                bool(optim.use_distributed_optimizer) and parallel_state.get_data_parallel_world_size() > 1
            )
            chunks = wrap_ddp(chunks, self.config, sharded)
            self.optimizer, self.scheduler = build_optimizer(chunks, optim, dtype, sharded)
            self._wire_grad_hooks(chunks)
        self.model = chunks
        self.pad_multiple = parallel.tp * (2 * parallel.cp if parallel.cp > 1 else 1)

    def _wire_grad_hooks(self, chunks: list[Any]) -> None:
        from megatron.core.distributed import finalize_model_grads

        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss

    def load_hf(self, hf_dir: str) -> None:
        """This rank's shards from a Hugging Face checkpoint (streaming, only the tensors it needs)."""
        from checkpoint_converters import load_hf_weights

        load_hf_weights(self.model, hf_dir)
        if self.optimizer is not None:
            # bf16 training keeps fp32 master copies; refresh them from the loaded weights.
            self.optimizer.reload_model_params()

    # ----------------------------------------------------------------------------------------------
    def is_output_rank(self) -> bool:
        """The last pipeline stage holds logprobs and losses."""
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def _forward_step(self, loss_fn: LossFn, data_iterator: Iterator[dict[str, Any]], model: Any):
        mb = next(data_iterator)
        ids = mb["input_ids"]
        b, s = ids.shape
        pad = (-s) % self.pad_multiple
        padded = torch.nn.functional.pad(ids, (0, pad)) if pad else ids
        padded = padded.to(platform.device())
        positions = torch.arange(padded.shape[1], device=padded.device).unsqueeze(0).expand(b, -1)
        # Position t scores token t+1 (the last position a dummy target, dropped below). Given labels,
        # GPTModel scores its [s, b, V/tp] logits with Megatron's vocab-parallel cross entropy and returns
        # [b, s]: the vocabulary is never gathered, and never transposed to [b, s, V] (asked for logits it
        # copies them to that layout, and the backward copies the gradient back: on CPU that cost more than
        # the softmax itself, docs/policy.md).
        labels = torch.nn.functional.pad(padded[:, 1:], (0, 1))
        mask = platform.attention_mask(padded.shape[1], padded.device)
        if self.replay is not None:
            chunk = next(i for i, c in enumerate(self.model) if c is model)
            targets = self.replay.before_forward(chunk, mb, padded.shape[1])
        output = model(padded, positions, mask, labels=labels)
        if self.replay is not None:
            self.replay.after_forward(chunk, targets)

        def loss_func(token_loss: torch.Tensor):
            return loss_fn(-token_loss[:, : s - 1], mb)

        return output, loss_func

    def _run(self, micro_batches: list[dict[str, Any]], loss_fn: LossFn, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not micro_batches:
            raise ValueError("no micro-batches given")
        iters: Any = [iter(micro_batches) for _ in self.model]
        seq = max(mb["input_ids"].shape[1] for mb in micro_batches)
        seq += (-seq) % self.pad_multiple
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn),
            data_iterator=iters if len(self.model) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=micro_batches[0]["input_ids"].shape[0],
            forward_only=forward_only,
        )

    @torch.no_grad()
    def logprobs(self, micro_batches: list[dict[str, Any]]) -> list[torch.Tensor] | None:
        """Per-token logprobs [b, s-1] for each micro-batch on the last pipeline stage; None elsewhere."""
        for chunk in self.model:
            chunk.eval()
        if self.replay is not None:
            self.replay.reset_counts(counting=True)

        def collect(logprobs: torch.Tensor, mb: dict[str, Any]):
            return torch.zeros((), device=logprobs.device), 1, {"logprobs": logprobs.float().cpu()}

        out = self._run(micro_batches, collect, forward_only=True)
        return [o["logprobs"] for o in out] if self.is_output_rank() else None

    def train_step(self, micro_batches: list[dict[str, Any]], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over all micro-batches (gradient accumulation). Returns averaged metrics."""
        if self.optimizer is None:
            raise RuntimeError("policy was built with train=False")
        self.onload()  # state offloaded around generation (policy/offload.py) comes back first
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        if self.replay is not None:
            self.replay.reset_counts(counting=False)
        self.optimizer.zero_grad()

        def tracked(logprobs: torch.Tensor, mb: dict[str, Any]):
            loss_sum, count, metrics = loss_fn(logprobs, mb)
            count_t = torch.as_tensor(count, dtype=torch.int, device=loss_sum.device)
            report = {k: v.detach().float() for k, v in metrics.items()}
            report["_loss_sum"], report["_count"] = loss_sum.detach().float(), count_t.float()
            return loss_sum, count_t, report

        outputs = self._run(micro_batches, tracked, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        metrics = self._reduce_metrics(outputs)
        metrics.update(
            grad_norm=float(grad_norm or 0.0),
            lr=self.optimizer.param_groups[0]["lr"],
            update_ok=float(bool(ok)),
        )
        return metrics

    def _reduce_metrics(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Loss = global sum / global count; other metrics averaged over micro-batches and DP ranks.
        Computed on the last stage, then broadcast so every rank returns the same numbers."""
        from megatron.core import parallel_state

        keys = sorted(outputs[0]) if outputs else []
        if self.parallel.pp > 1:
            # Only the last stage knows the metric names; every stage must reduce the same tensor.
            box = [keys]
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast_object_list(
                box, src=last, group=parallel_state.get_pipeline_model_parallel_group()
            )
            keys = box[0]
        local = torch.zeros(len(keys) + 1, dtype=torch.float64)
        if self.is_output_rank() and outputs:
            for i, k in enumerate(keys):
                vals = torch.stack([o[k].reshape(()) for o in outputs]).double()
                local[i] = vals.sum() if k.startswith("_") else vals.mean()
            local[-1] = 1.0
        dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
        # Share the last stage's numbers with the other stages (only it computed them).
        dist.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
        n = max(local[-1].item(), 1.0)
        out = {k: local[i].item() / (1.0 if k.startswith("_") else n) for i, k in enumerate(keys)}
        if "_loss_sum" in out:
            out["loss"] = out.pop("_loss_sum") / max(out.pop("_count"), 1.0)
        return out

    def offload(self, what: str) -> int:
        """Frees the optimizer state (and grad buffers) until `onload` (policy/offload.py); returns bytes."""
        from megatron_rl.policy.offload import Offloader

        if self.optimizer is None or what == "none":
            return 0
        if getattr(self, "_offloader", None) is None:
            self._offloader = Offloader(p for _, p in self.named_parameters())
        self._offloaded_what = what
        return self._offloader.offload(self.optimizer, self.model, what)

    def onload(self) -> int:
        """Restores what `offload` freed (a no-op when nothing is offloaded); returns bytes."""
        offloader = getattr(self, "_offloader", None)
        self._offloaded_what = None
        return offloader.onload() if offloader is not None else 0

    @contextmanager
    def resident(self) -> Iterator[None]:
        """The whole training state on the device for the block (a checkpoint save or load), then offloaded
        again as it was."""
        what = getattr(self, "_offloaded_what", None)
        self.onload()
        try:
            yield
        finally:
            if what is not None:
                self.offload(what)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        from megatron.core.utils import unwrap_model

        for chunk in self.model:
            yield from unwrap_model(chunk).named_parameters()
