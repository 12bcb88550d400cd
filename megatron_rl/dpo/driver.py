"""Direct Preference Optimization on the Megatron policy: `python -m megatron_rl.launch dpo conf=dpo_tiny`.

The reference is a second, frozen Megatron model with the same layout, loaded from the same starting HF
weights (on resume too: the reference never changes). It costs one copy of the weights per rank (no
gradients, no optimizer state) and one forward pass per step; its logprobs for the validation set are
computed once. Loss and metrics: megatron_rl.algorithms.dpo via megatron_rl.dpo.loss.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from megatron_rl.dpo.loss import SUM_KEYS, dpo_with_sums, summarize
from megatron_rl.dtypes import precision
from megatron_rl.errors import UserError
from megatron_rl.progress import BARS
from megatron_rl.training.loop import RankContext, launch
from megatron_rl.training.sources import setting


def run(cfg: Any) -> int:
    return launch(cfg, DPOTask)


class DPOTask:
    kind = "dpo"
    title, bar_fields = BARS["dpo"]
    rows = 2  # chosen and rejected always share a micro-batch
    packing = True

    @staticmethod
    def val_settings(cfg: Any) -> tuple[int, float]:
        """(every K steps, held-out fraction). Until the schema has dpo.val_every/val_fraction, DPO validates
        every run.eval_every steps on sft.val_fraction of a JSONL file."""
        every = int(setting(cfg.dpo, "val_every", cfg.run.eval_every))
        fraction = float(setting(cfg.dpo, "val_fraction", cfg.sft.val_fraction))
        return every, fraction if every else 0.0

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.dpo.beta <= 0:
            raise UserError(f"dpo.beta must be > 0, got {cfg.dpo.beta}.")
        if cfg.dpo.sft_weight < 0:
            raise UserError(f"dpo.sft_weight must be >= 0, got {cfg.dpo.sft_weight}.")

    def __init__(self, cfg: Any, ctx: RankContext) -> None:
        from megatron_rl.policy.core import MegatronPolicy

        d = cfg.dpo
        self.batch_size = d.batch_size
        self.val_every, self.val_fraction = self.val_settings(cfg)
        self.loss_fn = partial(
            dpo_with_sums, beta=d.beta, sft_weight=d.sft_weight, length_average=d.length_average
        )
        # Without an SFT term the registered loss reports no sft_nll.
        self.sum_keys = tuple(k for k in SUM_KEYS if d.sft_weight or not k.endswith("sft_nll"))
        self.reference = MegatronPolicy(
            ctx.hf_config, ctx.parallel, dtype=precision(cfg.model.dtype), train=False
        )
        self.reference.load_hf(ctx.model_dir)

    def prepare(self, mbs: list[dict[str, Any]]) -> None:
        """Reference logprobs for micro-batches that lack them (only the last pipeline stage gets them)."""
        todo = [mb for mb in mbs if "ref_lp" not in mb]
        if not todo:
            return
        per_mb = self.reference.logprobs(todo) or [None] * len(todo)
        for mb, lp in zip(todo, per_mb):
            # None on earlier pipeline stages (they compute no loss); it also marks the micro-batch as
            # prepared, so every stage makes the same collective calls next time.
            mb["ref_lp"] = lp

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return summarize(metrics)
