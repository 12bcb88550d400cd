"""Policy losses and advantages against numbers worked out by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms.registry import get_advantage, get_policy_loss
from megatron_rl.errors import UserError

LN = math.log


def mb(ratios, adv, mask=None, **extra):
    """One sequence of tokens whose ratio pi/pi_old is given; old logprobs are all log(0.5)."""
    old = torch.full((1, len(ratios)), LN(0.5))
    lp = old + torch.log(torch.tensor([ratios]))
    m = torch.ones(1, len(ratios)) if mask is None else torch.tensor([mask], dtype=torch.float32)
    return lp, {"old_lp": old, "adv": torch.tensor([adv]), "mask": m, **extra}


def test_clip_higher_uses_separate_bounds():
    loss = get_policy_loss("clipped_pg")
    # A=+1: ratios 1.5 (clipped at 1+0.28) and 0.5 (unclipped side wins: max(-0.5, -0.8) = -0.5)
    lp, batch = mb([1.5, 0.5], 1.0)
    s, n, m = loss(lp, batch, clip_low=0.2, clip_high=0.28)
    assert n == 2 and s.item() == pytest.approx(-1.28 - 0.5)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    # A=-1: ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped at 1-0.2); ratio 1.5 -> max(1.5, 1.28) = 1.5
    lp, batch = mb([0.5, 1.5], -1.0)
    s, n, _ = loss(lp, batch, clip_low=0.2, clip_high=0.28)
    assert s.item() == pytest.approx(0.8 + 1.5)


def test_dual_clip_bounds_negative_advantages():
    lp, batch = mb([10.0], -1.0)
    # without: max(10, 1.28) = 10; with c=3: min(10, 3*1) = 3
    assert get_policy_loss("clipped_pg")(lp, batch)[0].item() == pytest.approx(10.0)
    assert get_policy_loss("clipped_pg")(lp, batch, dual_clip=3.0)[0].item() == pytest.approx(3.0)


def test_token_vs_sequence_mean():
    loss = get_policy_loss("clipped_pg")
    old = torch.full((2, 3), LN(0.5))
    batch = {"old_lp": old, "adv": torch.tensor([1.0, 2.0]), "mask": torch.tensor([[1.0, 0, 0], [1, 1, 1]])}
    # ratio 1 everywhere: per-token loss = -A. token_mean: sum = -1 - 2*3 = -7 over 4 tokens.
    s, n, _ = loss(old.clone(), batch, loss_agg="token_mean")
    assert (s.item(), int(n)) == (pytest.approx(-7.0), 4)
    # seq_mean: (-1/1) + (-6/3) = -3 over 2 sequences.
    s, n, _ = loss(old.clone(), batch, loss_agg="seq_mean")
    assert (s.item(), int(n)) == (pytest.approx(-3.0), 2)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", LN(0.5) - LN(0.25)),  # log(pi/ref) = log 2
        ("k3", 0.5 + (LN(0.5) - LN(0.25)) - 1.0),  # r - log r - 1 with r = ref/pi = 0.5, log r = -log 2
    ],
)
def test_kl_estimators(estimator, expected):
    lp, batch = mb([1.0], 0.0, ref_lp=torch.tensor([[LN(0.25)]]))
    s, _, m = get_policy_loss("clipped_pg")(lp, batch, kl_coef=0.1, kl_estimator=estimator)
    assert m["kl"].item() == pytest.approx(expected)
    assert s.item() == pytest.approx(0.1 * expected)  # A=0: only the KL term remains


def test_truncated_importance_sampling():
    # engine prob 0.1 vs old policy 0.5: weight exp(log .5 - log .1) = 5, truncated at cap 2.
    lp, batch = mb([1.0, 1.0], 1.0, engine_lp=torch.tensor([[LN(0.1), LN(0.4)]]))
    s, _, m = get_policy_loss("clipped_pg")(lp, batch, tis_cap=2.0)
    assert s.item() == pytest.approx(-(2.0 + 1.25))  # weights 2 (capped) and 0.5/0.4
    assert m["tis_weight_mean"].item() == pytest.approx((2.0 + 1.25) / 2)


def test_gradient_flows_only_through_unclipped_tokens():
    lp, batch = mb([1.5, 1.0], 1.0)
    lp.requires_grad_(True)
    get_policy_loss("clipped_pg")(lp, batch)[0].backward()
    # token 0 clipped (no grad); token 1: d(-A * exp(lp - old))/dlp = -ratio = -1
    assert lp.grad.tolist() == [[0.0, pytest.approx(-1.0)]]


def test_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = get_advantage("grpo")(r, 3, normalize_std=False)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()  # 0.57735
    adv = get_advantage("grpo")(r, 3, normalize_std=True)
    assert adv[0].item() == pytest.approx((2 / 3) / (std + 1e-6))
    # rloo: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    assert get_advantage("rloo")(r, 3).tolist()[:3] == pytest.approx([1.0, -0.5, -0.5])


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(UserError, match="clipped_pg"):
        get_policy_loss("ppo2")
    with pytest.raises(UserError, match="grpo"):
        get_advantage("gae")
