"""A deterministic, resumable order over a dataset: position p maps to an item index, and the whole state
is (position, seed) plus the epoch and dataset size it implies, so a checkpoint resumes at the exact item."""

from __future__ import annotations

import random
from typing import Any

from megatron_rl.errors import UserError


class ResumableOrder:
    """Epoch e (positions e*n .. e*n+n-1) visits every item once, in a permutation seeded by (seed, e).
    `num_items=None` is an endless stream (index = position), for generated data."""

    def __init__(self, num_items: int | None, seed: int = 0, shuffle: bool = True) -> None:
        if num_items is not None and num_items <= 0:
            raise UserError("The dataset is empty: there is nothing to iterate over.")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.position = 0
        self._perm: tuple[int, list[int]] | None = None  # (epoch, permutation), one epoch cached

    @property
    def epoch(self) -> int:
        return 0 if self.num_items is None else self.position // self.num_items

    def index(self, position: int) -> int:
        if self.num_items is None:
            return position
        epoch, offset = divmod(position, self.num_items)
        if not self.shuffle:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(self.num_items))
            random.Random(f"{self.seed}:{epoch}").shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1][offset]

    def take(self, n: int) -> list[int]:
        out = [self.index(self.position + i) for i in range(n)]
        self.position += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_items": self.num_items,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position. A checkpoint from a different seed or dataset size would silently resume
        at the wrong items, so that is an error (older states holding only `position` are accepted)."""
        for key, mine in (("seed", self.seed), ("num_items", self.num_items)):
            if key in state and state[key] != mine:
                raise UserError(
                    f"The checkpoint's data state has {key}={state[key]} but the dataset now has {key}={mine}; "
                    "the data changed since the checkpoint, so its position no longer names the same items."
                )
        self.position = int(state["position"])
