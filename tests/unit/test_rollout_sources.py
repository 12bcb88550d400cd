"""Which rollout source a GRPO run gets (grpo/async_rollouts.py), and the buffer's checkpoint form."""

from __future__ import annotations

import json

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.errors import UserError
from megatron_rl.generation.base import Sample
from megatron_rl.grpo.async_rollouts import Group, SyncRollouts, make_rollout_source


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


def test_a_buffered_group_round_trips_through_json():
    samples = [Sample([5, 6, 7], [-0.1, -0.2, -0.3], "stop", "12", 3, token_versions=[3, 4, 4])]
    group = Group(17, {"prompt": "5+7=", "answer": "12", "prompt_ids": [1, 2]}, samples, [1.0])
    back = Group.from_json(json.loads(json.dumps(group.as_json())))
    assert back == group and back.oldest_version() == 3
