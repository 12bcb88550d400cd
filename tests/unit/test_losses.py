"""Policy, SFT and DPO losses against numbers worked out by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms.dpo import dpo_loss
from megatron_rl.algorithms.gspo import gspo_loss
from megatron_rl.algorithms.losses import clipped_pg_loss, sft_loss
from megatron_rl.algorithms.registry import get_policy_loss, register_policy_loss
from megatron_rl.errors import UserError

LN = math.log


def tokens(ratios, adv, mask=None, **extra):
    """One sequence whose tokens have the given ratio pi/pi_old; old logprobs are all log(0.5)."""
    old = torch.full((1, len(ratios)), LN(0.5))
    lp = old + torch.log(torch.tensor([ratios], dtype=torch.float32))
    m = torch.ones(1, len(ratios)) if mask is None else torch.tensor([mask], dtype=torch.float32)
    return lp, {"old_lp": old, "adv": torch.tensor([adv]), "mask": m, **extra}


def pg(lp, mb, **kw):
    return clipped_pg_loss(
        lp, mb["old_lp"], mb["adv"], mb["mask"], mb.get("ref_lp"), mb.get("engine_lp"), **kw
    )


# ------------------------------------------------------------------------------------------ clipped_pg
def test_clip_higher_uses_separate_bounds():
    loss = get_policy_loss("clipped_pg")
    # A=+1: ratio 1.5 -> max(-1.5, -1.28) = -1.28 (clipped at 1+0.28); ratio 0.5 -> max(-0.5, -0.8) = -0.5
    lp, mb = tokens([1.5, 0.5], 1.0)
    s, n, m = loss(lp, mb, clip_low=0.2, clip_high=0.28)
    assert int(n) == 2 and s.item() == pytest.approx(-1.28 - 0.5)
    assert m["clip_fraction"].item() == pytest.approx(0.5)  # only the 1.5 token is clipped
    assert m["ratio_mean"].item() == pytest.approx(1.0)  # (1.5 + 0.5) / 2
    # A=-1: ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped at 1-0.2); ratio 1.5 -> max(1.5, 1.28) = 1.5
    lp, mb = tokens([0.5, 1.5], -1.0)
    s, _, _ = loss(lp, mb, clip_low=0.2, clip_high=0.28)
    assert s.item() == pytest.approx(0.8 + 1.5)
    # Symmetric clip 0.2/0.2 on A=+1, ratio 1.5: -1.2
    lp, mb = tokens([1.5], 1.0)
    assert loss(lp, mb, clip_low=0.2, clip_high=0.2)[0].item() == pytest.approx(-1.2)


def test_dual_clip_bounds_negative_advantages_only():
    lp, mb = tokens([10.0], -1.0)
    # without: max(-(-1)*10, -(-1)*1.28) = 10; with c=3: min(10, 3 * 1) = 3
    assert pg(lp, mb)[0].item() == pytest.approx(10.0)
    loss, m = pg(lp, mb, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and m["dual_clip_fraction"].item() == 1.0
    # A=+1, ratio 10: max(-10, -1.28) = -1.28, dual clip does not apply to positive advantages
    lp, mb = tokens([10.0], 1.0)
    assert pg(lp, mb, dual_clip=3.0)[0].item() == pytest.approx(-1.28)


def batch_of_two():
    """Sequence 0: A=1, 1 token; sequence 1: A=2, 3 tokens; all ratios 1 so per-token loss = -A."""
    old = torch.full((2, 3), LN(0.5))
    return old.clone(), old, torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0, 0], [1, 1, 1]])


def test_token_vs_sequence_mean():
    lp, old, adv, mask = batch_of_two()
    loss = get_policy_loss("clipped_pg")
    mb = {"old_lp": old, "adv": adv, "mask": mask}
    # token_mean: sum = -1 + (-2 * 3) = -7 over 4 tokens
    s, n, _ = loss(lp, mb, loss_agg="token_mean")
    assert (s.item(), int(n)) == (pytest.approx(-7.0), 4)
    assert clipped_pg_loss(lp, old, adv, mask, loss_agg="token_mean")[0].item() == pytest.approx(-7 / 4)
    # seq_mean: (-1/1) + (-6/3) = -3 over 2 sequences
    s, n, _ = loss(lp, mb, loss_agg="seq_mean")
    assert (s.item(), int(n)) == (pytest.approx(-3.0), 2)
    assert clipped_pg_loss(lp, old, adv, mask, loss_agg="seq_mean")[0].item() == pytest.approx(-3 / 2)
    # A sequence with no loss token (e.g. overlong-filtered) counts for neither: still -7/4 and -3/2
    lp3, old3 = torch.cat([lp, lp[:1]]), torch.cat([old, old[:1]])
    adv3, mask3 = torch.tensor([1.0, 2.0, 5.0]), torch.cat([mask, torch.zeros(1, 3)])
    s, n, _ = loss(lp3, {"old_lp": old3, "adv": adv3, "mask": mask3}, loss_agg="seq_mean")
    assert (s.item(), int(n)) == (pytest.approx(-3.0), 2)
    assert clipped_pg_loss(lp3, old3, adv3, mask3, loss_agg="token_mean")[0].item() == pytest.approx(-7 / 4)


@pytest.mark.parametrize("loss_agg, expected", [("token_mean", -7 / 4), ("seq_mean", -3 / 2)])
def test_micro_batches_with_global_normaliser_sum_to_the_batch_loss(loss_agg, expected):
    lp, old, adv, mask = batch_of_two()
    lp.requires_grad_(True)
    full, _ = clipped_pg_loss(lp, old, adv, mask, loss_agg=loss_agg)
    (full_grad,) = torch.autograd.grad(full, lp)
    # Two micro-batches of one sequence each, normalised by the global counts (4 tokens / 2 sequences):
    # token_mean: -1/4 + -6/4 = -7/4; seq_mean: -1/2 + -2/2 = -3/2
    parts, grads = [], []
    for i in (0, 1):
        part = lp[i : i + 1].detach().clone().requires_grad_(True)
        loss, _ = clipped_pg_loss(
            part,
            old[i : i + 1],
            adv[i : i + 1],
            mask[i : i + 1],
            loss_agg=loss_agg,
            global_num_tokens=4,
            global_num_seqs=2,
        )
        parts.append(loss.item())
        grads.append(torch.autograd.grad(loss, part)[0])
    assert full.item() == pytest.approx(expected) and sum(parts) == pytest.approx(expected)
    assert torch.allclose(torch.cat(grads), full_grad)
    # Registered form: sums and counts add up the same way across micro-batches.
    reg = get_policy_loss("clipped_pg")
    outs = [
        reg(
            lp[i : i + 1],
            {"old_lp": old[i : i + 1], "adv": adv[i : i + 1], "mask": mask[i : i + 1]},
            loss_agg=loss_agg,
        )
        for i in (0, 1)
    ]
    assert (sum(o[0].item() for o in outs) / sum(int(o[1]) for o in outs)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "estimator, expected, grad",
    [
        # k1 = log(pi/ref) = log(0.5/0.25) = log 2; d/dlogpi = 1
        ("k1", LN(2.0), 1.0),
        # k3 = r - log r - 1 with r = ref/pi = 0.5: 0.5 + log 2 - 1 = 0.19315; d/dlogpi = 1 - r = 0.5
        ("k3", 0.5 + LN(2.0) - 1.0, 0.5),
    ],
)
def test_kl_estimators(estimator, expected, grad):
    lp, mb = tokens([1.0], 0.0, ref_lp=torch.tensor([[LN(0.25)]]))
    lp.requires_grad_(True)
    loss, m = pg(lp, mb, kl_coef=0.1, kl_estimator=estimator)
    assert m["kl"].item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.1 * expected)  # A=0: only the KL term remains
    loss.backward()
    assert lp.grad.item() == pytest.approx(0.1 * grad)


def test_truncated_importance_sampling():
    # old policy prob 0.5; engine probs 0.1 and 0.4: weights 0.5/0.1 = 5 -> capped at 2, and 0.5/0.4 = 1.25
    lp, mb = tokens([1.0, 1.0], 1.0, engine_lp=torch.tensor([[LN(0.1), LN(0.4)]]))
    s, _, m = get_policy_loss("clipped_pg")(lp, mb, tis_cap=2.0)
    assert s.item() == pytest.approx(-(2.0 + 1.25))  # ratio 1, A=1: -1 * weight per token
    assert m["tis_mean"].item() == pytest.approx((2.0 + 1.25) / 2)
    assert m["tis_clip_fraction"].item() == pytest.approx(0.5)
    # tis_cap=None: engine logprobs are ignored (plain -A * ratio = -1 per token)
    assert get_policy_loss("clipped_pg")(lp, mb, tis_cap=None)[0].item() == pytest.approx(-2.0)


def test_missing_tensors_for_requested_terms_are_errors_not_silent():
    lp, mb = tokens([1.0], 1.0)
    with pytest.raises(ValueError, match="engine"):
        pg(lp, mb, tis_cap=2.0)
    with pytest.raises(ValueError, match="ref"):
        pg(lp, mb, kl_coef=0.1)


def test_gradient_flows_only_through_unclipped_tokens():
    lp, mb = tokens([1.5, 1.0], 1.0)
    lp.requires_grad_(True)
    get_policy_loss("clipped_pg")(lp, mb)[0].backward()
    # token 0 clipped (no grad); token 1: d(-A * exp(lp - old))/dlp = -A * ratio = -1
    assert lp.grad.tolist() == [[0.0, pytest.approx(-1.0)]]


def test_token_level_advantages():
    lp, mb = tokens([1.0, 1.0], 0.0)
    # per-token A = [1, -3], ratio 1: losses -1 and +3, token mean 1
    loss, _ = clipped_pg_loss(lp, mb["old_lp"], torch.tensor([[1.0, -3.0]]), mb["mask"])
    assert loss.item() == pytest.approx(1.0)


def test_padding_garbage_cannot_poison_loss_or_gradients():
    old = torch.tensor([[LN(0.5), 0.0]])
    lp = torch.tensor([[LN(0.5), 200.0]], requires_grad=True)  # exp(200) overflows float32
    ref = torch.tensor([[LN(0.5), -500.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, _ = clipped_pg_loss(lp, old, torch.tensor([1.0]), mask, ref, kl_coef=0.1, kl_estimator="k3")
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)  # only the first token: -A * 1, KL 0
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1].item() == 0.0


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"dual_clip": 0.5}, "grpo.dual_clip"),
        ({"loss_agg": "sum"}, "grpo.loss_agg"),
        ({"clip_low": 1.0}, "grpo.clip_low"),
        ({"kl_estimator": "k2"}, "grpo.kl_estimator"),
        ({"tis_cap": 0.0}, "grpo.tis_cap"),
    ],
)
def test_bad_settings_name_the_config_key(settings, key):
    lp, mb = tokens([1.0], 1.0, engine_lp=torch.zeros(1, 1))
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        get_policy_loss("clipped_pg")(lp, mb, **settings)


# ------------------------------------------------------------------------------------------ GSPO
def test_gspo_uses_one_sequence_ratio():
    # ratios 2 and 0.5: sequence ratio exp(mean(log 2, log 0.5)) = exp(0) = 1, inside any clip range.
    lp, mb = tokens([2.0, 0.5], 1.0)
    lp.requires_grad_(True)
    loss, m = gspo_loss(lp, mb["old_lp"], mb["adv"], mb["mask"])
    assert loss.item() == pytest.approx(-1.0) and m["clip_fraction"].item() == 0.0
    loss.backward()
    # d(-A * s)/dlogp_t = -A * s / |y| = -1/2 for both tokens (token-level PPO would clip the first)
    assert lp.grad.tolist() == [[pytest.approx(-0.5), pytest.approx(-0.5)]]


def test_gspo_clips_whole_sequences():
    # ratios 1.1, 1.1: s = 1.1. A=+1: clipped at 1 + 4e-4 -> loss -1.0004, no gradient.
    lp, mb = tokens([1.1, 1.1], 1.0)
    lp.requires_grad_(True)
    loss, m = get_policy_loss("gspo")(lp, mb)[0], get_policy_loss("gspo")(lp, mb)[2]
    assert loss.item() == pytest.approx(-1.0004) and m["clip_fraction"].item() == 1.0
    loss.backward()
    assert lp.grad.abs().sum().item() == 0.0
    # A=-1: max(1.1, 1.0004) = 1.1, unclipped; gradient -A * s / |y| = 1.1 / 2 = 0.55 per token
    lp, mb = tokens([1.1, 1.1], -1.0)
    lp.requires_grad_(True)
    s, n, _ = get_policy_loss("gspo")(lp, mb)
    assert (s.item(), int(n)) == (pytest.approx(1.1), 1)
    s.backward()
    assert lp.grad.tolist() == [[pytest.approx(0.55), pytest.approx(0.55)]]


def test_gspo_sequence_level_importance_weight():
    # old - engine per token: log(0.5/0.25) = log 2 and log(0.5/0.5) = 0 -> weight exp((log 2)/2) = sqrt 2
    lp, mb = tokens([1.0, 1.0], 1.0, engine_lp=torch.tensor([[LN(0.25), LN(0.5)]]))
    loss, m = gspo_loss(lp, mb["old_lp"], mb["adv"], mb["mask"], engine_logprobs=mb["engine_lp"], tis_cap=5.0)
    assert loss.item() == pytest.approx(-math.sqrt(2)) and m["tis_mean"].item() == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------------------------------ SFT
def test_sft_loss_is_masked_token_mean_nll():
    lp = torch.tensor([[LN(0.5), LN(0.25), LN(0.1)], [LN(0.125), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token mean: (log 2 + log 4 + log 8) / 3 = (1 + 2 + 3) log 2 / 3 = 2 log 2
    loss, m = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(2 * LN(2)) and m["num_tokens"].item() == 3
    # seq mean: ((log 2 + log 4) / 2 + log 8) / 2 = (1.5 + 3) log 2 / 2 = 2.25 log 2
    assert sft_loss(lp, mask, loss_agg="seq_mean")[0].item() == pytest.approx(2.25 * LN(2))
    assert sft_loss(lp, mask, global_num_tokens=6)[0].item() == pytest.approx(6 * LN(2) / 6)
    s, n, _ = get_policy_loss("nll")(lp, {"mask": mask})
    assert (s.item(), int(n)) == (pytest.approx(6 * LN(2)), 3)


# ------------------------------------------------------------------------------------------ DPO
SIG = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_dpo_loss_rewards_and_accuracy():
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -10.0])
    rc, rr = torch.tensor([-12.0, -12.0]), torch.tensor([-12.0, -12.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: chosen 0.1*(-10+12) = 0.2, rejected 0.1*(-14+12) = -0.2, margin 0.4, loss -log sigmoid(0.4)
    # pair 1: chosen 0, rejected 0.1*(-10+12) = 0.2, margin -0.2, loss -log sigmoid(-0.2)
    l0, l1 = -LN(SIG(0.4)), -LN(SIG(-0.2))  # 0.513015, 0.798139
    assert loss.item() == pytest.approx((l0 + l1) / 2)
    assert m["accuracy"].item() == 0.5
    assert m["chosen_reward"].item() == pytest.approx(0.1) and m["rejected_reward"].item() == pytest.approx(
        0.0
    )
    assert m["margin"].item() == pytest.approx(0.1)
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, global_num_pairs=4)[0].item() == pytest.approx((l0 + l1) / 4)


def test_dpo_length_average_and_sft_term():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -14.0, -12.0, -12.0))
    nc, nr = torch.tensor([2.0]), torch.tensor([4.0])
    # per token: chosen 0.1*(-5 + 6) = 0.1, rejected 0.1*(-3.5 + 3) = -0.05, margin 0.15
    loss, m = dpo_loss(pc, pr, rc, rr, nc, nr, beta=0.1, length_average=True)
    assert loss.item() == pytest.approx(-LN(SIG(0.15))) and m["margin"].item() == pytest.approx(0.15)
    # + sft_weight * chosen NLL per token = 0.5 * 10/2 = 2.5 (on top of the plain DPO loss, margin 0.4)
    loss, m = dpo_loss(pc, pr, rc, rr, nc, nr, beta=0.1, sft_weight=0.5)
    assert loss.item() == pytest.approx(-LN(SIG(0.4)) + 2.5) and m["sft_nll"].item() == pytest.approx(5.0)
    with pytest.raises(UserError, match="dpo.beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_dpo_micro_batch_form_matches_the_functional_one():
    # Rows [chosen, rejected]; per-token logprobs summed under the mask give pc=-10, pr=-14 (2 and 4 tokens).
    lp = torch.tensor([[-4.0, -6.0, 0.0, 0.0, 9.0], [-2.0, -3.0, -4.0, -5.0, 9.0]], requires_grad=True)
    ref = torch.tensor([[-6.0, -6.0, 0, 0, 0], [-3.0, -3.0, -3.0, -3.0, 0]])
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    s, n, m = get_policy_loss("dpo")(lp, {"mask": mask, "ref_lp": ref}, beta=0.1)
    assert int(n) == 1 and s.item() == pytest.approx(-LN(SIG(0.4))) and m["accuracy"].item() == 1.0
    s.backward()
    # d/d(pc) of -log sigmoid(beta*(pc - pr) + c) = -beta * (1 - sigmoid(0.4)) on every chosen token
    g = -0.1 * (1 - SIG(0.4))
    assert lp.grad[0, :2].tolist() == pytest.approx([g, g]) and lp.grad[:, 4].abs().sum() == 0


# ------------------------------------------------------------------------------------------ registry
def test_unknown_names_list_the_registered_ones():
    with pytest.raises(UserError, match=r"grpo\.loss.*clipped_pg, decoupled_pg, dpo, gspo, nll"):
        get_policy_loss("ppo2")


def test_registering_a_custom_loss():
    @register_policy_loss("test_only_constant")
    def constant(logprobs, mb, **_):
        return logprobs.sum() * 0 + 3.0, torch.tensor(1), {}

    assert get_policy_loss("test_only_constant") is constant
    with pytest.raises(ValueError, match="registered twice"):
        register_policy_loss("test_only_constant")(lambda *a: None)
