"""decoupled_pg (algorithms/decoupled.py): the clipped ratio against the proximal policy, times the
behaviour weight pi_prox / pi_engine, tokens above the cap masked (no loss, still in the normaliser)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms.decoupled import decoupled_pg_loss
from megatron_rl.algorithms.losses import clipped_pg_loss
from megatron_rl.algorithms.registry import get_policy_loss

LP = [[-1.0, -2.0, -0.5, -3.0]]
PROX = [[-1.1, -2.0, -0.6, -3.0]]
MASK = [[1.0, 1.0, 1.0, 0.0]]


def test_on_policy_data_equals_the_clipped_loss():
    lp = torch.tensor(LP, requires_grad=True)
    args = (torch.tensor(PROX), torch.tensor([0.7]), torch.tensor(MASK))
    ours, _ = decoupled_pg_loss(lp, *args, engine_logprobs=torch.tensor(PROX), tis_cap=2.0)
    theirs, _ = clipped_pg_loss(lp, *args, tis_cap=None)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-7)


def test_behaviour_weights_and_the_cap_by_hand():
    lp = torch.tensor(LP, requires_grad=True)
    engine = torch.tensor([[-1.1, -4.0, -0.4, -9.0]])  # token 1: w = e^2 > cap, masked; token 3: padding
    loss, metrics = decoupled_pg_loss(
        lp, torch.tensor(PROX), torch.tensor([1.0]), torch.tensor(MASK), engine_logprobs=engine,
        tis_cap=2.0, clip_low=0.2, clip_high=0.28,
    )  # fmt: skip
    r0, r2 = math.exp(0.1), math.exp(0.1)  # both inside [0.8, 1.28]
    w2 = math.exp(-0.2)
    expected = (-(1.0 * r0) + 0.0 - w2 * r2) / 3  # three loss tokens in the normaliser
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["behav_masked_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert lp.grad[0, 1].item() == 0.0 and lp.grad[0, 3].item() == 0.0  # masked token, padding
    assert lp.grad[0, 0].item() == pytest.approx(-r0 / 3, rel=1e-6)


def test_registered_and_needs_engine_logprobs():
    loss = get_policy_loss("decoupled_pg")
    mb = {"old_lp": torch.tensor(PROX), "adv": torch.tensor([1.0]), "mask": torch.tensor(MASK)}
    with pytest.raises(ValueError, match="engine_lp"):
        loss(torch.tensor(LP), mb, tis_cap=2.0)
    total, count, _ = loss(torch.tensor(LP), {**mb, "engine_lp": torch.tensor(PROX)}, tis_cap=2.0)
    assert count.item() == 3 and torch.isfinite(total)
