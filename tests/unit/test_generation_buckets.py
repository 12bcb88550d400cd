"""Refit buckets (the flat safetensors layout every transport moves) and the mismatch metric."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from megatron_rl.generation import buckets
from megatron_rl.generation.metrics import token_mult_prob_error


def mixed() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(5, 3, generator=g).bfloat16()),
        ("model.norm.weight", torch.randn(3, generator=g)),
        ("scale", torch.tensor(2.5, dtype=torch.float64)),
        ("mask", torch.tensor([True, False, True])),
        ("lm_head.weight", torch.randn(4, 7, generator=g).t()),  # not contiguous
        ("ids", torch.arange(6, dtype=torch.int32).view(2, 3)),
    ]


@pytest.mark.parametrize("capacity", [None, 4096])
def test_layout_round_trips_and_is_a_valid_safetensors_file(tmp_path, capacity):
    items = mixed()
    layout = buckets.plan(items, capacity)
    buf = torch.full((capacity or layout.size,), 255, dtype=torch.uint8)
    assert buckets.write(layout, buf) == layout.size
    got = buckets.read(buf)
    assert [n for n, _ in got] == [n for n, _, _ in layout.offsets]
    for name, t in items:
        view = dict(got)[name]
        assert view.dtype == t.dtype and view.shape == t.shape and torch.equal(view, t)
        start = next(off for n, _, off in layout.offsets if n == name)
        assert start % t.element_size() == 0  # every tensor aligned to its element size
    path = tmp_path / "bucket.safetensors"
    buf.numpy().tofile(path)
    with safe_open(str(path), framework="pt") as f:
        expected = {n for n, _ in items} | ({buckets.PADDING} if capacity else set())
        assert set(f.keys()) == expected
        for name, t in items:
            assert torch.equal(f.get_tensor(name), t)


def test_views_share_the_buffer_memory():
    layout = buckets.plan([("w", torch.ones(4))])
    buf = torch.zeros(layout.size, dtype=torch.uint8)
    buckets.write(layout, buf)
    ((_, view),) = buckets.read(buf)
    buf[layout.offsets[0][2] : layout.offsets[0][2] + 4].zero_()
    assert view.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_plan_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="does not fit a 100-byte buffer"):
        buckets.plan([("w", torch.zeros(100))], capacity=100)
    with pytest.raises(ValueError, match="'w' appears twice"):
        buckets.plan([("w", torch.zeros(1)), ("w", torch.zeros(1))])
    with pytest.raises(TypeError, match="'w' has dtype torch.complex64"):
        buckets.plan([("w", torch.zeros(1, dtype=torch.complex64))])


def test_buckets_respect_the_size_and_pull_lazily():
    pulled = []

    def stream():
        for i, n in enumerate([10, 10, 10, 30, 5, 5]):  # float32 elements: 40, 40, 40, 120, 20, 20 bytes
            pulled.append(i)
            yield f"t{i}", torch.zeros(n)

    it = buckets.iter_buckets(stream(), bucket_bytes=100)
    first = next(it)
    assert [n for n, _ in first] == ["t0", "t1"] and pulled == [0, 1, 2]  # only one tensor past the bucket
    rest = [[n for n, _ in b] for b in it]
    assert rest == [["t2"], ["t3"], ["t4", "t5"]]  # t3 alone: larger than a bucket


def test_buckets_reject_non_tensors():
    with pytest.raises(TypeError, match="'w' is a list"):
        list(buckets.iter_buckets([("w", [1.0])], 10))


def test_token_mult_prob_error_values():
    policy = torch.tensor([-1.0, -2.0, -0.5, 0.0])
    engine = torch.tensor([-1.0, -2.5, -0.3, -math.inf])  # the last position is masked out (prompt/padding)
    mask = torch.tensor([1, 1, 1, 0])
    expected = (1 + math.exp(0.5) + math.exp(0.2)) / 3
    assert token_mult_prob_error(policy, engine, mask) == pytest.approx(
        expected, rel=1e-6
    )  # inputs are float32
    assert token_mult_prob_error(policy, policy, mask) == 1.0
    assert token_mult_prob_error(policy, engine, torch.zeros(4)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        token_mult_prob_error(policy, engine[:3], mask)
