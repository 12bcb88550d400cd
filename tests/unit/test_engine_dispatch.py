"""The engine group's dispatch rule (least outstanding work, whole prompts) and its engine count."""

from __future__ import annotations

from megatron_rl.generation.group import assign_prompts


def test_least_outstanding_work_not_round_robin():
    # Engine 0 is busy: small prompts all go to engine 1 until it has as much in flight.
    assert assign_prompts([10.0, 10.0, 10.0], {0: 100.0, 1: 0.0}) == {1: [0, 1, 2]}
    assert assign_prompts([10.0, 10.0, 10.0], {0: 15.0, 1: 0.0}) == {0: [2], 1: [0, 1]}


def test_largest_prompts_first_balance_the_work():
    work = [1.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    out = assign_prompts(work, {0: 0.0, 1: 0.0})
    assert out == {0: [1], 1: [0, 2, 3, 4, 5, 6, 7, 8]}  # 8 tokens each; each engine's prompts in order
    assert sorted(i for idx in out.values() for i in idx) == list(range(len(work)))


def test_only_the_engines_offered_are_used():
    out = assign_prompts([5.0] * 6, {0: 0.0, 2: 0.0})
    assert out == {0: [0, 2, 4], 2: [1, 3, 5]}
    assert assign_prompts([], {0: 0.0}) == {}


def test_engine_count_from_config():
    from megatron_rl.config.compose import compose
    from megatron_rl.grpo.setup import derive_num_engines

    assert derive_num_engines(compose("tiny")) == 1  # CPU: one unless set
    assert derive_num_engines(compose("tiny", ["generation.num_engines=2"])) == 2
