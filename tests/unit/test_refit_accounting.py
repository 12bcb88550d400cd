"""Refit accounting (generation/fanout.py): the sender's waits are attributed to the engines' load and
receive of the buckets waited for, newest first, never more than was waited; the rest is unexplained."""

from __future__ import annotations

import pytest

from megatron_rl.generation.fanout import PARTS, _Clock, account


def test_a_wait_is_the_newest_buckets_load_then_receive_then_the_bucket_before():
    clock = _Clock()
    older = [{"receive_s": 0.1, "load_s": 0.3}]
    newer = [{"receive_s": 0.2, "load_s": 0.5}, {"receive_s": 0.05, "load_s": 0.6}]  # two engines: slowest
    clock.waited(1.0, [older, newer])
    assert clock.parts["engine_load_s"] == pytest.approx(0.6 + 0.2)
    assert clock.parts["engine_receive_s"] == pytest.approx(0.2)
    clock.waited(0.25, [older])  # less than the bucket's load: all of it is load
    assert clock.parts["engine_load_s"] == pytest.approx(0.8 + 0.25)


def test_what_no_part_explains_is_reported():
    stats = dict.fromkeys(PARTS, 0.2) | {"refit_s": 1.25}
    out = account(stats)
    assert out["unexplained_s"] == pytest.approx(0.25) and out["unexplained_fraction"] == pytest.approx(0.2)


def test_the_exporters_time_is_export():
    import time

    clock = _Clock()

    def slow_export():
        for i in range(3):
            time.sleep(0.02)
            yield f"w{i}", i

    assert [name for name, _ in clock.timed(slow_export())] == ["w0", "w1", "w2"]
    assert 0.06 <= clock.parts["export_s"] < 0.5
