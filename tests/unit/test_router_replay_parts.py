"""Router replay's pieces without processes: the engine's request ids, a sample's routing from captured rows,
collation beside input_ids, one router's token slice, the trajectory column, the config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_rl.errors import UserError
from megatron_rl.generation import routing
from megatron_rl.grpo.batch import Rollouts
from megatron_rl.models.tiny import tiny_config
from megatron_rl.policy.router_replay import check_usable, collate_routing, router_tokens


def test_request_key_reads_vllm_request_ids():
    assert routing.request_key("17-1a2b3c4d") == ("17", 0)
    assert routing.request_key("2_17-1a2b3c4d") == ("17", 2)


def test_assemble_places_rows_by_position_and_names_a_gap():
    ids = np.array([[[1, 2]], [[3, 0]], [[2, 3]], [[0, 1]]], dtype=np.uint8)  # 4 rows, 1 MoE layer, k=2
    got = routing.assemble(np.array([2, 0, 1, 2]), ids, [1], num_layers=2, length=3)
    assert got.shape == (3, 2, 2)
    assert got[:, 1].tolist() == [[3, 0], [2, 3], [0, 1]]  # position 2 recomputed: the latest rows win
    assert got[:, 0].abs().sum() == 0  # the dense layer
    with pytest.raises(RuntimeError, match="missed 1 of 4"):
        routing.assemble(np.array([0, 1, 2]), ids[:3], [1], num_layers=2, length=4)


def test_native_output_is_cut_or_padded_to_the_sample():
    full = np.arange(5 * 2 * 2).reshape(5, 2, 2)
    assert routing.native(full, 4).shape == (4, 2, 2)
    short = routing.native(full, 7)
    assert short.shape == (7, 2, 2) and (short[5:] == -1).all() and short[:5].tolist() == full.tolist()


def test_collate_routing_pads_with_minus_one_like_the_token_fields():
    a = {"ids": torch.arange(4), "routing": torch.ones(3, 2, 2, dtype=torch.int16)}
    b = {"ids": torch.arange(6), "routing": torch.full((5, 2, 2), 2, dtype=torch.int16)}
    c = {"ids": torch.arange(3)}  # no routing: routed by the trainer
    out = collate_routing([a, b, c])
    assert out.shape == (3, 5, 2, 2)
    assert (out[0, :3] == 1).all() and (out[0, 3:] == -1).all()
    assert (out[1] == 2).all() and (out[2] == -1).all()
    assert collate_routing([c]) is None
    with pytest.raises(ValueError, match="sequence 0: routing has shape"):
        collate_routing([{"ids": torch.arange(4), "routing": torch.ones(4, 2, 2, dtype=torch.int16)}])


def test_router_tokens_follow_megatrons_s_major_order_and_the_sp_slice():
    b, s1, layers, k = 2, 5, 3, 2
    r = torch.arange(b * s1 * layers * k, dtype=torch.int16).reshape(b, s1, layers, k)
    full = router_tokens(r, width=6, layer=1, tp_rank=0, tp=1, sp=False)
    assert full.shape == (6 * b, k)
    for t in range(6):
        for row in range(b):
            want = r[row, t, 1].long() if t < s1 else torch.tensor([-1, -1])
            assert full[t * b + row].tolist() == want.tolist()
    halves = [router_tokens(r, 6, 1, rank, 2, sp=True) for rank in range(2)]
    assert torch.equal(torch.cat(halves), full)  # rank r routes sequence positions [3r, 3r + 3)


def test_routing_column_survives_selection_and_concatenation():
    def batch(tag: int) -> Rollouts:
        out = Rollouts([[1, 2]] * 2, [[3], [4, 5]], [[0.0], [0.0, 0.0]], ["stop"] * 2, [{}] * 2, group_size=1)
        out.routed_experts = [torch.full((2, 1, 1), tag), torch.full((3, 1, 1), tag + 1)]
        return out

    both = Rollouts.concat([batch(10), batch(20)])
    picked = both.select_groups([3, 0])
    assert [int(r[0, 0, 0]) for r in picked.routed_experts] == [21, 10]
    picked.advantages = torch.zeros(2)
    assert [s["routing"].shape[0] for s in picked.sequences()] == [3, 2]
    assert picked.trajectory(0).routed_experts is picked.routed_experts[0]


def test_router_replay_needs_an_moe_model_and_no_context_parallelism():
    check_usable("engine", tiny_config("qwen3_moe"), cp=1)
    check_usable("off", tiny_config("llama"), cp=4)
    with pytest.raises(UserError, match="needs a mixture-of-experts model; LlamaForCausalLM is dense"):
        check_usable("measure", tiny_config("llama"), cp=1)
    with pytest.raises(UserError, match="context parallelism"):
        check_usable("engine", tiny_config("mixtral"), cp=2)
