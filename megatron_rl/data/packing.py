"""Micro-batches by token budget instead of a fixed count, and equal micro-batch counts across ranks.

A micro-batch is padded to its longest sequence (rounded up to `pad_multiple`, e.g. the TP size), so its
cost is rows x padded width. Packing sorts by length, longest first, and fills each micro-batch until the
next sequence would exceed the budget: similar lengths share a micro-batch (little padding), and for this
cost model it gives the fewest micro-batches. A sequence (or unit) longer than the budget on its own goes
into a micro-batch alone rather than being dropped or failing: the budget is a memory/speed knob, and the
maximum length is enforced where data is loaded or generated (policy.max_seq_len, max_new_tokens).

`keep_together=k` treats consecutive runs of k sequences as one unit that is never split (DPO's
chosen/rejected rows). Output lists hold the original indices, units in their original order, so the
layout inside a micro-batch is preserved. Everything is deterministic (ties broken by index).
"""

from __future__ import annotations

from collections.abc import Sequence


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _units(lengths: Sequence[int], keep_together: int) -> list[tuple[list[int], int]]:
    if keep_together < 1 or len(lengths) % keep_together:
        raise ValueError(f"{len(lengths)} sequences do not split into units of keep_together={keep_together}")
    return [
        (list(range(s, s + keep_together)), max(lengths[s : s + keep_together]))
        for s in range(0, len(lengths), keep_together)
    ]


def _cost(units: list[tuple[list[int], int]], members: list[int], pad_multiple: int) -> int:
    rows = sum(len(units[u][0]) for u in members)
    return rows * _round_up(max(units[u][1] for u in members), pad_multiple)


def _flatten(units: list[tuple[list[int], int]], members: list[int]) -> list[int]:
    return [i for u in sorted(members) for i in units[u][0]]


def _pack_units(units: list[tuple[list[int], int]], budget: int, pad_multiple: int) -> list[list[int]]:
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(range(len(units)), key=lambda u: (-units[u][1], u))
    groups: list[list[int]] = []
    current: list[int] = []
    rows = width = 0  # longest first: a micro-batch's width is that of its first unit
    for u in order:
        members, length = units[u]
        if current and (rows + len(members)) * width > budget:
            groups.append(current)
            current, rows = [], 0
        if not current:
            width = _round_up(length, pad_multiple)
        current.append(u)
        rows += len(members)
    if current:
        groups.append(current)
    return groups


def pack_by_token_budget(
    lengths: Sequence[int], budget: int, *, keep_together: int = 1, pad_multiple: int = 1
) -> list[list[int]]:
    """Index lists of micro-batches whose padded size (rows x padded longest) stays within `budget`,
    except a single over-long unit, which is alone."""
    units = _units(lengths, keep_together)
    return [_flatten(units, g) for g in _pack_units(units, budget, pad_multiple)]


def _split_to_count(
    units: list[tuple[list[int], int]], groups: list[list[int]], target: int, pad_multiple: int
) -> list[list[int]]:
    groups = [list(g) for g in groups]
    while len(groups) < target:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(
                f"cannot make {target} micro-batches from {sum(len(g) for g in groups)} sequence unit(s): "
                "give every rank at least that many sequences (shard_for_data_parallel keeps counts equal)"
            )
        # Halve the most expensive micro-batch: its longest half stays, the rest follows right after it.
        i = max(splittable, key=lambda j: (_cost(units, groups[j], pad_multiple), -j))
        by_len = sorted(groups[i], key=lambda u: (-units[u][1], u))
        half = (len(by_len) + 1) // 2
        groups[i : i + 1] = [by_len[:half], by_len[half:]]
    return groups


def plan_micro_batches(
    lengths_per_rank: Sequence[Sequence[int]],
    budget: int,
    *,
    keep_together: int = 1,
    pad_multiple: int = 1,
) -> list[list[list[int]]]:
    """Packs each data-parallel rank's shard (indices local to that shard) and splits micro-batches so
    every rank runs the same number of them (Megatron's schedules need one count for the whole step)."""
    per_rank = []
    for lengths in lengths_per_rank:
        units = _units(lengths, keep_together)
        per_rank.append((units, _pack_units(units, budget, pad_multiple)))
    target = max((len(groups) for _, groups in per_rank), default=0)
    return [
        [_flatten(units, g) for g in _split_to_count(units, groups, target, pad_multiple)]
        for units, groups in per_rank
    ]


def shard_for_data_parallel(
    lengths: Sequence[int], num_ranks: int, *, keep_together: int = 1
) -> list[list[int]]:
    """Splits sequences over data-parallel ranks: unit counts differ by at most one, tokens balanced
    (longest unit first, to the lightest rank that still has room). Equal counts mean every rank can
    always be split to the same number of micro-batches. Indices are sorted within each shard."""
    units = _units(lengths, keep_together)
    if len(units) < num_ranks:
        raise ValueError(f"{len(units)} sequence unit(s) cannot fill {num_ranks} data-parallel ranks")
    base, extra = divmod(len(units), num_ranks)
    capacity = [base + (1 if r < extra else 0) for r in range(num_ranks)]
    loads, counts = [0] * num_ranks, [0] * num_ranks
    shards: list[list[int]] = [[] for _ in range(num_ranks)]
    for u in sorted(range(len(units)), key=lambda u: (-units[u][1], u)):
        open_ranks = [r for r in range(num_ranks) if counts[r] < capacity[r]]
        r = min(open_ranks, key=lambda r: (loads[r], r))
        shards[r].extend(units[u][0])
        loads[r] += sum(lengths[i] for i in units[u][0])
        counts[r] += 1
    return [sorted(s) for s in shards]
