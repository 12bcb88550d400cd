"""Which rollout source a GRPO run gets (grpo/async_rollouts.py), and the buffer's checkpoint form."""

from __future__ import annotations

import os
from dataclasses import asdict

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.errors import UserError
from megatron_rl.generation.base import Sample
from megatron_rl.grpo.async_rollouts import (
    Group,
    SyncRollouts,
    make_rollout_source,
    pack_groups,
    unpack_groups,
)


def test_colocated_or_zero_staleness_is_the_synchronous_schedule(tmp_path, capsys):
    for overrides in (["grpo.max_staleness=1"], ["grpo.max_staleness=0", "generation.colocated=false"]):
        source = make_rollout_source(compose("tiny", overrides), None, None, None, None, tmp_path)
        assert isinstance(source, SyncRollouts)
    assert "runs the synchronous schedule with colocated engines" in capsys.readouterr().err


def test_multi_turn_is_refused_by_name(tmp_path):
    cfg = compose("tiny", ["grpo.max_staleness=1", "generation.colocated=false", "data.kind=environment"])
    with pytest.raises(UserError, match="grpo.max_staleness=1"):
        make_rollout_source(cfg, None, None, None, None, tmp_path)


def test_stale_policy_is_checked():
    with pytest.raises(UserError, match="stale_policy"):
        compose("tiny", ["grpo.stale_policy=later"])


def test_the_buffer_round_trips_through_a_checkpoint_with_its_arrays_out_of_the_json(tmp_path):
    from megatron_rl.training.checkpoints import STATE_FILE, CheckpointManager

    item = {"prompt": "5+7=", "answer": "12", "prompt_ids": [1, 2]}
    groups = [
        Group(17, item, [Sample([5, 6, 7], [-0.1, -0.2, -1 / 3], "stop", "12", 3, 1, [3, 4, 4]),
                         Sample([8] * 900, [-0.5] * 900, "length", "é" * 900, 4)], [1.0, 0.0]),
        Group(18, item, [Sample([9], [-2.0], "stop", "", 4)], [0.5]),
    ]  # fmt: skip
    buffer, tensors = pack_groups(groups)
    ckpt = CheckpointManager(tmp_path).save(3, os.makedirs, {"async": {"buffer": buffer}, "tensors": tensors})
    state = CheckpointManager.state(ckpt)
    back = unpack_groups(state["async"]["buffer"], state["tensors"])
    assert back == groups and back[0].oldest_version() == 3  # float64 logprobs: exactly equal
    assert (ckpt / STATE_FILE).stat().st_size < 2000  # 904 tokens and their text are not in the JSON
    assert unpack_groups([], {}) == []
    # A checkpoint from before kept whole samples in the JSON: still read.
    old = [{"position": 18, "item": item, "rewards": [0.5], "samples": [asdict(groups[1].samples[0])]}]
    assert unpack_groups(old, {}) == groups[1:]


def test_a_checkpoint_snapshot_does_not_change_when_a_group_is_filtered_afterwards(tmp_path):
    """The trainer writes the snapshot after releasing the lock while the producer goes on: a group that
    finishes (filtered) after the snapshot must stay "in flight" there only, or a resumed run would both
    record it as filtered and generate it again (one prompt counted twice)."""
    from types import SimpleNamespace

    from megatron_rl.grpo.async_rollouts import AsyncRollouts

    cfg = compose(
        "tiny", ["grpo.max_staleness=1", "generation.colocated=false", "grpo.dynamic_sampling=true"]
    )
    engine = SimpleNamespace(weight_version=0)
    data = SimpleNamespace(state_dict=lambda: {"position": 1})
    env = SimpleNamespace(score=lambda texts, meta: [1.0] * len(texts))  # all equal: filtered
    source = AsyncRollouts(engine, data, env, None, cfg, tmp_path / "rollout_prompts.jsonl")
    source.in_flight["p0.1"] = Group(0, {"prompt": "1+1=", "answer": "2", "prompt_ids": [1, 2]})
    snapshot = source.state_dict()
    source._finish("p0.1", [Sample([3], [-0.1], "stop", "2", 0)] * cfg.grpo.num_generations)
    assert source._since_step["filtered"] == [0]
    assert [g["position"] for g in snapshot["async"]["in_flight"]] == [0]
    assert snapshot["async"]["filtered"] == [] and snapshot["async"]["scored"] == []
