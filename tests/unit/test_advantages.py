"""Advantage estimators and GRPO batch shaping against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms.registry import get_advantage, register_advantage
from megatron_rl.errors import UserError

# Two groups of 3: [1, 0, 0] and [0, 1, 1]
R = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])


def test_grpo_mean_centred():
    # group means 1/3 and 2/3
    adv = get_advantage("grpo")(R, 3, normalize_std=False)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])


def test_grpo_std_normalised():
    # unbiased std of [1, 0, 0]: sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735 (same for [0, 1, 1])
    std = math.sqrt(1 / 3)
    adv = get_advantage("grpo")(R, 3, normalize_std=True, eps=1e-6)
    expected = [v / (std + 1e-6) for v in (2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3)]
    assert adv.tolist() == pytest.approx(expected)
    # group of 2 with rewards 1, 0: mean 0.5, std sqrt(0.5) -> +-0.5 / 0.70711 = +-0.70711
    adv = get_advantage("grpo")(torch.tensor([1.0, 0.0]), 2)
    assert adv.tolist() == pytest.approx([math.sqrt(0.5), -math.sqrt(0.5)], rel=1e-5)


def test_equal_rewards_give_zero_advantage():
    adv = get_advantage("grpo")(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert adv.tolist() == [0.0] * 6  # 0 / (0 + eps), no NaN


def test_rloo_leave_one_out():
    # group [1, 0, 0]: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5; group [0, 1, 1]: -1, 0.5, 0.5
    adv = get_advantage("rloo")(R, 3)
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, -1.0, 0.5, 0.5])
    # = G/(G-1) x mean-centred: 1.5 * 2/3 = 1
    assert adv.tolist() == pytest.approx((1.5 * get_advantage("grpo")(R, 3, normalize_std=False)).tolist())
    # optional std scaling divides by the same sqrt(1/3)
    scaled = get_advantage("rloo")(R, 3, normalize_std=True)
    assert scaled[0].item() == pytest.approx(1.0 / (math.sqrt(1 / 3) + 1e-6))


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_bad_group_shapes(name):
    with pytest.raises(UserError, match="num_generations"):
        get_advantage(name)(torch.ones(5), 2)  # 5 rewards, groups of 2
    with pytest.raises(UserError, match="at least 2"):
        get_advantage(name)(torch.ones(4), 1)


def test_unknown_estimator_lists_the_registered_ones():
    with pytest.raises(UserError, match=r"grpo\.advantage.*grpo, rloo"):
        get_advantage("gae")


def test_custom_estimator_registers():
    @register_advantage("test_only_raw")
    def raw(rewards, group_size, **_):
        return rewards

    assert get_advantage("test_only_raw") is raw

