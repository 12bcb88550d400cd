"""Which examples a step trains on, which data-parallel rank gets which, and how they form micro-batches.

Every rank computes the same global batch (a pure function of seed and position), then keeps its own
data-parallel shard: no data moves between ranks, and the resume state is one position.
"""

from __future__ import annotations

import random
from typing import Any

from megatron_rl.data.packing import plan_micro_batches, shard_for_data_parallel
from megatron_rl.data.sampler import ResumableOrder
from megatron_rl.errors import UserError


class TrainOrder:
    """Seeded epochs over the training indices (`None`: an endless generator, position i is example i)."""

    def __init__(self, indices: list[int] | None, seed: int) -> None:
        self.indices = indices
        self.order = ResumableOrder(len(indices) if indices is not None else None, seed=seed)

    def take(self, n: int) -> list[int]:
        picked = self.order.take(n)
        return picked if self.indices is None else [self.indices[i] for i in picked]

    @property
    def epoch(self) -> float:
        return self.order.position / len(self.indices) if self.indices else 0.0

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def check_batch_size(batch_size: int, dp: int, key: str) -> None:
    """Every data-parallel rank needs at least one example per step."""
    if batch_size < dp:
        raise UserError(
            f"{key}={batch_size} is smaller than the data-parallel size {dp}: every data-parallel rank needs "
            f"at least one example per step. Raise {key} or use fewer ranks."
        )


def holdout_split(
    n: int, fraction: float, seed: int, count: int | None = None
) -> tuple[list[int], list[int]]:
    """(train, validation) indices: a seeded `fraction` of n (at least one when fraction > 0), or exactly
    `count` examples when given, held out."""
    if count is None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
        k = 0 if fraction == 0 else max(1, round(n * fraction))
        held = f"a {fraction:.0%} validation set"
    else:
        k, held = count, f"{count} held-out example(s)"
    order = list(range(n))
    random.Random(f"{seed}:holdout").shuffle(order)
    if k >= n:
        raise ValueError(f"{n} example(s) cannot be split into training and {held}")
    return sorted(order[k:]), sorted(order[:k])


def rank_micro_batches(
    lengths: list[int],
    dp_size: int,
    dp_rank: int,
    budget: int,
    *,
    keep_together: int = 1,
    packing: bool = True,
    pad_multiple: int = 1,
    allow_empty: bool = False,
) -> list[list[int]]:
    """Row indices (into `lengths`) of this data-parallel rank's micro-batches. Shards are balanced by
    tokens; every rank gets the same number of micro-batches. packing=False puts one example (unit of
    `keep_together` rows) in each micro-batch: no padding at all, more per-micro-batch overhead.
    `allow_empty` (evaluation): fewer examples than ranks leaves some ranks without work."""
    units = len(lengths) // keep_together
    if units < dp_size:
        if not allow_empty:
            raise ValueError(f"{units} example(s) cannot fill {dp_size} data-parallel ranks")
        if dp_rank >= units:
            return []
        mine = list(range(dp_rank * keep_together, (dp_rank + 1) * keep_together))
        return [mine]
    shards = shard_for_data_parallel(lengths, dp_size, keep_together=keep_together)
    per_rank = [[lengths[i] for i in s] for s in shards]
    plan = plan_micro_batches(
        per_rank, budget if packing else 1, keep_together=keep_together, pad_multiple=pad_multiple
    )
    return [[shards[dp_rank][i] for i in group] for group in plan[dp_rank]]
