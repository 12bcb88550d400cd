"""Supervised fine-tuning on the Megatron policy: `python -m megatron_rl.launch sft conf=sft_tiny`.

Loss: negative log-likelihood of response tokens only (assistant turns), averaged over every response
token of the global batch, whatever the packing and data-parallel split. Validation loss (same
definition) on a held-out share of the data every `sft.val_every` steps.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.progress import BARS
from megatron_rl.training.loop import RankContext, launch


def run(cfg: Any) -> int:
    return launch(cfg, SFTTask)


class SFTTask:
    kind = "sft"
    title, bar_fields = BARS["sft"]
    rows = 1
    sum_keys: tuple[str, ...] = ()

    @staticmethod
    def val_settings(cfg: Any) -> tuple[int, float]:
        """(every K steps, held-out fraction of a JSONL file); K=0 turns validation off."""
        every = int(cfg.sft.val_every)
        return every, float(cfg.sft.val_fraction) if every else 0.0

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        pass

    def __init__(self, cfg: Any, ctx: RankContext) -> None:
        from megatron_rl.algorithms.registry import get_policy_loss

        self.batch_size, self.packing = cfg.sft.batch_size, cfg.sft.packing
        self.val_every, self.val_fraction = self.val_settings(cfg)
        self._nll = get_policy_loss("nll")

    def prepare(self, mbs: list[dict[str, Any]]) -> None:
        pass

    def loss_fn(self, logprobs: torch.Tensor, mb: dict[str, Any]):
        return self._nll(logprobs, mb, loss_agg="token_mean")

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        # "nll" is a per-micro-batch mean; "loss" (global sum / global count) is the exact one.
        return {k: v for k, v in metrics.items() if k != "nll"}
