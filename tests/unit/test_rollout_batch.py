"""GRPO batch shaping: dynamic-sampling group selection, overlong filtering, and token alignment."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.grpo.batch import Rollouts
from megatron_rl.grpo.rollout import informative_groups


def rollouts() -> Rollouts:
    # 2 prompts x 2 samples; prompt lengths 3 and 2.
    return Rollouts(
        prompt_ids=[[1, 2, 3], [1, 2, 3], [7, 8], [7, 8]],
        response_ids=[[10, 11], [12], [13, 14, 15], [16]],
        engine_logprobs=[[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6], [-0.7]],
        finish_reasons=["stop", "length", "length", "stop"],
        metadata=[{"answer": "1"}] * 4,
        group_size=2,
        responses=["a", "b", "c", "d"],
        rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]),
        advantages=torch.tensor([0.0, 0.0, -0.7, 0.7]),
    )


def test_informative_groups_drop_equal_rewards():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2) == [1]


def test_select_groups_keeps_whole_groups_in_order():
    kept = rollouts().select_groups([1])
    assert kept.response_ids == [[13, 14, 15], [16]]
    assert kept.advantages.tolist() == pytest.approx([-0.7, 0.7]) and len(kept) == 2


def test_sequences_align_response_tokens_with_next_token_logprobs():
    seqs = rollouts().sequences()
    s = seqs[0]  # prompt [1,2,3] + response [10,11]: positions 2 and 3 predict tokens 10 and 11
    assert s["ids"].tolist() == [1, 2, 3, 10, 11]
    assert s["mask"].tolist() == [0, 0, 1, 1] and s["resp"].tolist() == [0, 0, 1, 1]
    assert torch.allclose(s["engine_lp"], torch.tensor([0, 0, -0.1, -0.2]))
    assert seqs[2]["adv"] == torch.tensor(-0.7).item()


def test_overlong_filter_masks_truncated_responses_only():
    seqs = rollouts().sequences(mask_truncated=True)
    assert [s["mask"].sum().item() for s in seqs] == [2, 0, 0, 1]  # finish_reason "length" -> no loss
    assert [s["resp"].sum().item() for s in seqs] == [2, 1, 3, 1]  # still counted for the mismatch metric
