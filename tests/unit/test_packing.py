"""Token-budget packing, equal micro-batch counts across ranks, data-parallel sharding and collation."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.data.collate import collate_sequences
from megatron_rl.data.packing import (
    pack_by_token_budget,
    plan_micro_batches,
    shard_for_data_parallel,
)


def padded_cost(group, lengths, multiple=1):
    return len(group) * -(-max(lengths[i] for i in group) // multiple) * multiple


def test_packing_by_hand():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30]
    groups = pack_by_token_budget(lengths, 24)
    # longest first: 30 alone (over budget); 12,9 -> 2x12=24; 7,7,5 -> 3x7=21 (a 4th row would be 28);
    # 3,2 -> 2x3=6. Indices listed in their original order inside a micro-batch.
    assert groups == [[7], [1, 3], [0, 4, 5], [2, 6]]
    assert pack_by_token_budget(lengths, 24) == groups  # deterministic


def test_packing_respects_budget_and_keeps_everything():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (200,), generator=g).tolist()
    groups = pack_by_token_budget(lengths, 256, pad_multiple=8)
    assert sorted(i for grp in groups for i in grp) == list(range(200))
    assert all(padded_cost(grp, lengths, 8) <= 256 for grp in groups)


def test_pad_multiple_counts_the_rounded_width():
    # widths 5 -> 8 with multiple 8: 3 rows cost 24 > 20, so 2 + 1; without rounding 3 x 5 = 15 fits.
    assert pack_by_token_budget([5, 5, 5], 20, pad_multiple=8) == [[0, 1], [2]]
    assert pack_by_token_budget([5, 5, 5], 20) == [[0, 1, 2]]


def test_keep_together_never_splits_a_pair():
    # units (0,1): width 6, (2,3): width 9, (4,5): width 3; budget 18.
    # (2,3): 2 rows x 9 = 18; adding (0,1) -> 4 x 9 = 36 > 18. (0,1): 2 x 6 = 12; adding (4,5) -> 4 x 6 = 24.
    lengths = [6, 4, 9, 2, 3, 3]
    assert pack_by_token_budget(lengths, 18, keep_together=2) == [[2, 3], [0, 1], [4, 5]]
    assert pack_by_token_budget(lengths, 24, keep_together=2) == [[2, 3], [0, 1, 4, 5]]
    with pytest.raises(ValueError, match="keep_together=2"):
        pack_by_token_budget([1, 2, 3], 10, keep_together=2)


def test_plan_gives_every_rank_the_same_count():
    per_rank = [[10, 10, 10, 10], [3, 3, 3, 3], [10, 1]]
    plans = plan_micro_batches(per_rank, 20)
    # natural counts: rank 0: 2 (2 x 10 each), rank 1: 1 (4 x 3 = 12), rank 2: 1 (2 x 10 = 20) -> target 2
    assert [len(p) for p in plans] == [2, 2, 2]
    assert plans[1] == [[0, 1], [2, 3]] and plans[2] == [[0], [1]]
    for plan, lengths in zip(plans, per_rank):
        assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
        assert all(padded_cost(g, lengths) <= 20 for g in plan)


def test_shard_for_data_parallel_equal_counts_balanced_tokens():
    lengths = [100, 90, 10, 10, 10, 10, 5, 5]
    shards = shard_for_data_parallel(lengths, 2)
    # longest first to the lightest rank with room (4 each; ties to the lower rank):
    # 100->r0 (100, 0), 90->r1 (100, 90), 10->r1 (100, 100), 10->r0 (110, 100), 10->r1 (110, 110),
    # 10->r0 (120, 110), 5->r1 (120, 115; r1 now holds 4), 5->r0 (125, 115)
    assert [len(s) for s in shards] == [4, 4]
    assert shards == [[0, 3, 5, 7], [1, 2, 4, 6]]
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert loads == [125, 115]
    pairs = shard_for_data_parallel([3, 3, 8, 8, 1, 1, 2, 2], 2, keep_together=2)
    assert all(len(s) == 4 and s[0] % 2 == 0 and s[1] == s[0] + 1 for s in pairs)
    with pytest.raises(ValueError, match="cannot fill 4"):
        shard_for_data_parallel([1, 2, 3], 4)


def test_collate_pads_and_aligns():
    seqs = [
        {"ids": torch.tensor([5, 6, 7]), "mask": torch.tensor([0.0, 1.0]), "adv": 0.5},
        {"ids": torch.tensor([8, 9]), "mask": torch.tensor([1.0]), "adv": -1.0},
    ]
    mb = collate_sequences(seqs, pad_id=0, pad_to_multiple=4)
    assert mb["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert mb["lengths"].tolist() == [3, 2]
    assert mb["mask"].tolist() == [[0, 1, 0], [1, 0, 0]]  # [b, s-1], zero past each end
    assert mb["adv"].tolist() == [0.5, -1.0]
    with pytest.raises(ValueError, match="per-token field 'mask' has shape"):
        collate_sequences([{"ids": torch.tensor([1, 2, 3]), "mask": torch.tensor([1.0])}])
