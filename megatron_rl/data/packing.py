"""Micro-batches by token budget instead of a fixed count.

Micro-batches are padded to their longest sequence, so the cost of a micro-batch is rows x longest. Sorting
by length first keeps similar lengths together (little padding); a sequence longer than the budget goes
alone rather than being dropped.
"""

from __future__ import annotations


def pack_by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Groups indices into micro-batches whose padded size (rows * max length) stays within `budget`."""
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i])
        if current and (len(current) + 1) * width > budget:
            groups.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        groups.append(current)
    return groups
