"""The placement table (megatron_rl.placement): every GPU recipe places, engine counts follow the layout, and
layouts that cannot be placed are named before anything starts (the planner and the runtime read the same)."""

from __future__ import annotations

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.config.schema import world_size
from megatron_rl.errors import LayoutError
from megatron_rl.placement import check, num_engines, placement, policy_bundles, policy_rank_gpus
from megatron_rl.planner import plan
from megatron_rl.planner.layout import resolve_arch
from megatron_rl.planner.memory import kv_bytes_per_token

# recipe -> (policy ranks, engines, GPUs per engine, nodes per engine)
GPU_RECIPES = {
    "llama70b": (128, 16, 8, 1),
    "llama8b": (8, 4, 2, 1),
    "mixtral8x7b": (32, 4, 8, 1),
    "qwen3_30b_a3b": (16, 4, 4, 1),
    "qwen3_235b_a22b": (256, 16, 16, 2),  # tp=8 x pp=2: a pipeline stage per node
    "deepseek_v3": (512, 8, 64, 8),  # tp=8 x pp=8
    "moonlight_16b_a3b": (16, 8, 2, 1),
}


@pytest.mark.parametrize("recipe", sorted(GPU_RECIPES))
def test_every_gpu_recipe_places_its_engines_as_its_comment_says(recipe):
    ranks, engines, width, nodes = GPU_RECIPES[recipe]
    table = placement(compose(recipe, []))
    assert table.ok, table.problems
    assert len(table.policy_ranks) == ranks and len(table.engines) == engines
    for e in table.engines:
        assert len(e.gpus) == width and len(e.nodes) == nodes
        # colocated: engine e shares exactly the GPUs of policy ranks e*w .. e*w+w-1
        assert [(table.policy_ranks[b].node, table.policy_ranks[b].gpu) for b in e.bundles] == list(e.gpus)
    used = [g for e in table.engines for g in e.gpus]
    assert len(used) == len(set(used)) == ranks  # every GPU hosts exactly one engine shard


def test_llama70b_is_one_engine_per_node():
    table = placement(compose("llama70b", []))
    assert [e.as_json() for e in table.engines[:2]] == [
        {"engine": 0, "node": 0, "gpus": list(range(8))},
        {"engine": 1, "node": 1, "gpus": list(range(8))},
    ]
    assert sorted(e.node for e in table.engines) == list(range(16))


def test_a_spanning_engine_lists_its_nodes_and_their_gpus():
    row = placement(compose("qwen3_235b_a22b", [])).engines[3].as_json()
    assert row == {"engine": 3, "node": [6, 7], "gpus": [list(range(8)), list(range(8))]}


def test_a_pipeline_engine_is_tp_times_pp_gpus_and_spans_nodes_by_its_stages():
    spanning = ["cluster.nodes=2", "generation.tp=4", "generation.pp=4", "generation.span_nodes=true"]
    table = check(compose("llama8b", spanning))
    assert table.engine_width == 16 and [e.as_json() for e in table.engines] == [
        {"engine": 0, "node": [0, 1], "gpus": [list(range(8)), list(range(8))]}
    ]
    problems = placement(compose("llama8b", ["generation.tp=8", "generation.pp=2"])).problems
    assert any(
        "an engine of generation.tp*pp=8*2 GPUs is wider than a node (8 GPUs): set generation.span_nodes=true"
        in p
        for p in problems
    ), problems


def test_expert_parallel_engines_need_experts_and_pipeline_stages_cache_their_own_layers():
    with pytest.raises(
        LayoutError, match=r"generation.expert_parallel=true needs a mixture-of-experts model"
    ):
        plan(compose("llama8b", ["generation.expert_parallel=true"]))
    moe = compose("qwen3_235b_a22b", [])
    assert moe.generation.expert_parallel and moe.generation.pp == 2
    arch = resolve_arch(moe)
    assert kv_bytes_per_token(arch, 8, 2, pp=2) * 2 == kv_bytes_per_token(arch, 8, 2)  # 47 of 94 layers


def test_cpu_runs_keep_one_engine_and_plain_bundles():
    cfg = compose("tiny", [])
    table = check(cfg)
    assert num_engines(cfg) == 1 and [e.gpus for e in table.engines] == [()]
    assert policy_bundles(cfg, table) == [{"CPU": 0.5}, {"CPU": 0.5}] and policy_rank_gpus(cfg, table) == 0
    assert num_engines(compose("tiny", ["generation.num_engines=2"])) == 2


def test_colocated_bundles_carry_the_engines_cpus_and_ranks_leave_them_a_gpu_share():
    cfg = compose("llama8b", [])
    table = check(cfg)
    bundles = policy_bundles(cfg, table)
    # alike (Ray numbers bundles in no node order): a rank's CPUs plus an engine process's, one whole GPU
    assert bundles == [{"CPU": 9.0, "GPU": 1.0}] * 8
    assert policy_rank_gpus(cfg, table) == 0.5


def test_a_separate_pool_takes_the_last_gpus_and_the_policy_the_rest():
    cfg = compose("llama8b", ["generation.colocated=false", "generation.gpus=4"])
    table = check(cfg)
    assert world_size(cfg) == 4 and len(table.policy_ranks) == 4
    assert [e.as_json() for e in table.engines] == [
        {"engine": 0, "node": 0, "gpus": [4, 5]},
        {"engine": 1, "node": 0, "gpus": [6, 7]},
    ]
    assert policy_rank_gpus(cfg, table) == 1.0
    sft = compose("sft_llama8b", ["generation.colocated=false", "generation.gpus=4"], command="sft")
    assert world_size(sft) == 8  # SFT has no generation pool: every GPU trains


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["generation.tp=16"], "wider than a node (8 GPUs): set generation.span_nodes=true"),
        (["generation.tp=3"], "do not tile the 8 policy GPUs"),
        (["generation.num_engines=5"], "5 engines of generation.tp=2 GPUs need 10 GPUs"),
        (["generation.colocated=false"], "needs generation.gpus > 0"),
        (["generation.colocated=false", "generation.gpus=8"], "leaves none of the 8 GPUs to the policy"),
        (["cluster.gpus_per_node=6", "cluster.nodes=2", "generation.tp=4"], "engines [1] would cross nodes"),
        (
            ["cluster.gpus_per_node=6", "cluster.nodes=2", "policy.parallel.tp=4"],
            "policy TP groups [1] cross",
        ),
        (
            ["cluster.nodes=3", "generation.colocated=false", "generation.gpus=20"]
            + ["generation.tp=16", "generation.span_nodes=true"],
            "spanning engines [0] would start inside a node",
        ),
    ],
)
def test_a_layout_that_cannot_be_placed_names_why(overrides, why):
    cfg = compose("llama8b", overrides)
    assert any(why in p for p in placement(cfg).problems), placement(cfg).problems
    with pytest.raises(LayoutError, match="Placement check failed"):
        check(cfg)


def test_the_planner_refuses_what_the_runtime_cannot_place():
    with pytest.raises(LayoutError, match="span_nodes"):
        plan(compose("qwen3_235b_a22b", ["generation.span_nodes=false"]))
    assert plan(compose("llama70b", [])).phases["engines"] == 16
