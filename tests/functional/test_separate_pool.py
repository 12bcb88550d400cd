"""A separate generation pool across nodes, on CPU: a simulated 2-node Ray cluster (ray.cluster_utils, two
raylets of one CPU each). A TP=2 Megatron policy fills one node, two vLLM engines the other; the policy's
rank 0 refits both in one gloo broadcast group (`auto` picks broadcast for an engine on another node), one
export for the two. Afterwards every engine holds exactly the policy's exported weights (read back from
the engine, fp32, bit for bit) and reports the new version.

The module runs its own cluster: it disconnects from the suite's shared one first and reconnects a fresh
shared one when done (tests/conftest.py's fixture only starts it once per session).
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional.engine_weights import assert_same_weights


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from megatron_rl.ray_utils import init_ray

    shared = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if shared:
            init_ray(num_cpus=2, log_to_driver=False)  # as tests/conftest.py's ray_cluster left it


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    return [str(save_tiny_checkpoint(root / f"m{seed}", "llama", seed=seed)) for seed in range(2)]


@pytest.fixture(scope="module")
def pool(two_nodes, models):
    """(policy, engines): the policy is placed first, so its placement group packs it onto one node and
    the engines can only go to the other."""
    from megatron_rl.generation.client import EngineClient
    from megatron_rl.grpo.policy_group import PolicyGroup
    from megatron_rl.grpo.policy_worker import PolicySpec
    from megatron_rl.parallel import ParallelConfig

    spec = PolicySpec(models[1], ParallelConfig(tp=2, sequence_parallel=True))
    policy = PolicyGroup(spec, 2, gpus_per_rank=0, cpus_per_rank=0.5)
    engines = []
    try:
        refit = RefitSettings(transport="auto", bucket_mb=0.25)
        for _ in range(2):
            settings = EngineSettings(max_model_len=256, seed=0)
            engines.append(EngineClient(models[0], settings, num_cpus=0.5, refit=refit))
        yield policy, engines
    finally:
        for engine in engines:
            engine.shutdown()
        policy.shutdown()


def test_policy_and_engines_sit_on_different_nodes(pool):
    import ray

    policy, engines = pool
    policy_nodes = set(ray.util.placement_group_table(policy.ranks.pg)["bundles_to_node_id"].values())
    engine_nodes = {e.info["node_id"] for e in engines}
    assert len(policy_nodes) == 1 and len(engine_nodes) == 1 and policy_nodes != engine_nodes


def test_broadcast_refit_gives_every_engine_the_policy_weights(pool, models):
    policy, engines = pool
    exported = policy.hf_weights()
    assert_same_weights(engines[0].read_weights(), load_file(f"{models[0]}/model.safetensors").items())
    for version in (1, 2):  # the second refit reuses the group
        stats = policy.push_hf_weights(engines, version)
        assert stats["transport"] == "broadcast" and stats["missing"] == [] and stats["version"] == version
        assert [e["transport"] for e in stats["engines"]] == ["broadcast", "broadcast"]
        assert stats["bytes"] == sum(t.numel() * t.element_size() for _, t in exported)  # one export
        for engine in engines:
            assert engine.version() == version
            assert_same_weights(engine.read_weights(), exported)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    prompt = [3, 89, 87, 73, 86, 203, 21, 27]
    outs = [e.generate([prompt], greedy)[0][0] for e in engines]
    assert outs[0].token_ids == outs[1].token_ids and {o.weight_version for o in outs} == {2}
