"""One export fanned out to several engines (generation/fanout.py): two vLLM engines on the shared Ray
cluster receive each bucket once through shared memory (both map the same slot file), through one gloo
broadcast group, or through both at once (one engine each); afterwards each engine holds exactly the
exported weights (read back from the engine, fp32, bit for bit) and reports the new version. The refit's
figures split its seconds into export, transport, engine receive, engine load and checks.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional.engine_weights import assert_same_weights

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=8)
PROMPT = [3, 89, 87, 73, 86, 203, 21, 27, 15, 22, 25, 35, 4, 203, 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fanout")
    return [str(save_tiny_checkpoint(root / f"m{seed}", "llama", seed=seed)) for seed in range(3)]


def hf_weights(model_dir: str):
    return load_file(f"{model_dir}/model.safetensors").items()


@pytest.fixture(scope="module")
def engines(ray_cluster, models):
    from megatron_rl.generation.client import EngineClient

    # 256 KiB buckets: the tiny model takes 12 of them, so slots are refilled while engines hold views.
    refit = RefitSettings(transport="shm", bucket_mb=0.25, slots=2)
    clients = [
        EngineClient(models[0], EngineSettings(max_model_len=256, seed=0), num_cpus=0.25, refit=refit)
        for _ in range(2)
    ]
    yield clients
    for client in clients:
        client.shutdown()


class TrainerRank:
    """Stands in for the policy's rank 0: another process, handed the (pickled) engine clients."""

    def push(self, clients, model_dir: str, version: int) -> dict:
        from megatron_rl.generation.fanout import send_to_engines

        return send_to_engines(clients, hf_weights(model_dir), version)


def check_refit(stats: dict, engines: list, model_dir: str, version: int, transports: list[str]) -> None:
    assert stats["missing"] == [] and stats["tensors"] == 39 and stats["buckets"] == 12
    assert stats["bytes"] == sum(t.numel() * 4 for _, t in hf_weights(model_dir))  # the export, counted once
    assert [e["transport"] for e in stats["engines"]] == transports
    assert sorted(e["engine"] for e in stats["engines"]) == sorted(c.actor_id for c in engines)
    for engine in engines:
        assert engine.version() == version
        assert_same_weights(engine.read_weights(), hf_weights(model_dir))
        assert engine.generate([PROMPT], GREEDY)[0][0].weight_version == version
    parts = [stats[p] for p in ("export_s", "transport_s", "engine_receive_s", "engine_load_s", "checks_s")]
    assert all(p >= 0 for p in parts) and stats["engine_load_s"] > 0 and stats["transport_s"] > 0
    assert stats["unexplained_s"] == pytest.approx(stats["refit_s"] - sum(parts))
    assert -0.01 < stats["unexplained_fraction"] < 0.5, stats  # parts never count the same second twice


def test_engines_start_with_the_checkpoint_weights(engines, models):
    """The read-back itself: the engines' weights (linear layers read from the CPU kernels' packed copy)
    are the checkpoint's, and a different checkpoint's are told apart."""
    weights = engines[0].read_weights()
    assert_same_weights(weights, hf_weights(models[0]))
    with pytest.raises(AssertionError):
        assert_same_weights(weights, hf_weights(models[1]))


def test_shared_memory_fanout_packs_each_bucket_once(engines, models):
    from megatron_rl.generation import fanout, transports

    version = engines[0].version() + 1
    stats = fanout.send_to_engines(engines, hf_weights(models[1]), version)
    assert stats["transport"] == "shm"
    check_refit(stats, engines, models[1], version, ["shm", "shm"])
    # One sender, one set of slot files, for both engines.
    (sender,) = [s for s in transports._SENDERS.values() if s.kind == "shm"]
    assert sorted(c.actor_id for c in sender.clients) == sorted(c.actor_id for c in engines)
    assert sorted(p.name for p in sender.dir.iterdir()) == ["slot0.safetensors", "slot1.safetensors"]


@pytest.mark.parametrize("split", ["broadcast", "shm+broadcast"])
def test_refit_from_another_process(engines, models, split):
    """broadcast: one gloo group of the trainer and both engines, each tensor broadcast once.
    shm+broadcast: the per-engine choice of a mixed placement (here forced), in one pass over the buckets."""
    import ray

    kinds = ["broadcast", "broadcast"] if split == "broadcast" else ["shm", "broadcast"]
    clients = [c.with_refit(transport=k) for c, k in zip(engines, kinds)]
    model = models[2] if split == "broadcast" else models[1]
    rank0 = ray.remote(num_cpus=0.1)(TrainerRank).remote()
    try:
        version = engines[0].version() + 1
        stats = ray.get(rank0.push.remote(clients, model, version), timeout=180)
    finally:
        ray.kill(rank0)
    assert stats["transport"] == split
    check_refit(stats, engines, model, version, kinds)


def test_a_failing_engine_fails_the_refit_naming_it(engines, models):
    from megatron_rl.generation import fanout
    from megatron_rl.ray_utils import WorkerError

    v = engines[0].version()
    with pytest.raises(WorkerError, match=r"engine \d of 2.*not newer"):
        fanout.send_to_engines(engines, hf_weights(models[1]), v)
    assert [e.version() for e in engines] == [v, v]  # both still serve, at the old version


# Refit from a pipelined policy (generation/stages.py): each pipeline stage's sender streams its own stage.


@pytest.fixture(scope="module")
def pp2_policy(engines, models):
    """A PP=2 Megatron policy (two ranks, one stage each) beside the two engines, on models[2]'s weights."""
    from megatron_rl.grpo.policy_group import PolicyGroup
    from megatron_rl.grpo.policy_worker import PolicySpec
    from megatron_rl.parallel import ParallelConfig

    policy = PolicyGroup(PolicySpec(models[2], ParallelConfig(pp=2)), 2, gpus_per_rank=0, cpus_per_rank=0.5)
    yield policy
    policy.shutdown()


def test_a_tensor_sent_twice_fails_the_refit(engines, models):
    """Each parameter must arrive exactly once per refit (two stages must never both send one)."""
    from megatron_rl.generation import fanout
    from megatron_rl.ray_utils import WorkerError

    v = engines[0].version()
    weights = list(hf_weights(models[1]))
    with pytest.raises(WorkerError, match="received 'model.norm.weight' twice"):
        # the final norm goes first and again near the end, in another bucket (an in-bucket repeat is refused
        # while packing, buckets.plan)
        fanout.send_to_engines(engines, [w for w in weights if w[0] == "model.norm.weight"] + weights, v + 1)
    assert [e.version() for e in engines] == [v, v]


@pytest.mark.parametrize("transport", ["shm", "broadcast"])
def test_pipeline_stages_each_send_their_own_layers(engines, models, pp2_policy, transport):
    """shm: each stage's sender fills slot files of its own, the two stages at once. broadcast: one gloo
    group of both senders and both engines, each sender broadcasting from its own rank, stage after stage.
    Afterwards both engines hold exactly the policy's weights; no rank sent (or held) the whole model."""
    from megatron_rl.generation import fanout

    fanout.send_to_engines(engines, hf_weights(models[1]), engines[0].version() + 1)  # not the policy's
    version = engines[0].version() + 1
    stats = pp2_policy.push_hf_weights([c.with_refit(transport=transport) for c in engines], version)
    assert stats["transport"] == transport and stats["missing"] == [] and stats["version"] == version
    assert [e["transport"] for e in stats["engines"]] == [transport, transport]
    full = dict(hf_weights(models[2]))
    assert stats["tensors"] == len(full) and stats["bytes"] == sum(t.numel() * 4 for t in full.values())
    first, last = stats["senders"]
    assert (first["stage"], first["rank"], last["stage"], last["rank"]) == (0, 0, 1, 1)
    assert first["layers"] == [0, 1] and first["extra"] == ["model.embed_tokens.weight"]
    assert last["layers"] == [2, 3] and last["extra"] == ["lm_head.weight", "model.norm.weight"]
    assert first["tensors"] + last["tensors"] == len(full) and 0 < first["bytes"] < stats["bytes"]
    for engine in engines:
        assert engine.version() == version
        assert_same_weights(engine.read_weights(), full.items())
        assert engine.generate([PROMPT], GREEDY)[0][0].weight_version == version
    parts = [stats[p] for p in fanout.PARTS]
    assert all(p >= 0 for p in parts) and stats["engine_load_s"] > 0 and stats["transport_s"] > 0
    # Parts never count a second twice. With the stages at once (shm) a sender also waits while an engine
    # loads the other stage's buckets, which no part of its own explains: hence a looser upper bound.
    assert stats["slowest_sender"] in (0, 1) and -0.01 < stats["unexplained_fraction"] < 0.75, stats


def test_pipeline_refit_follows_a_changed_set_of_engines(engines, models, pp2_policy):
    """As an engine group does after a restart: the new engine alone (a new group for it), then all of them
    again (the stale groups closed on every sender, a new one built)."""
    clients = [c.with_refit(transport="broadcast") for c in engines]
    version = engines[0].version() + 1
    alone = pp2_policy.push_hf_weights(clients[1:], version)
    assert alone["missing"] == [] and [e["engine"] for e in alone["engines"]] == [engines[1].actor_id]
    assert [e.version() for e in engines] == [version - 1, version]
    both = pp2_policy.push_hf_weights(clients, version + 1)
    assert both["missing"] == [] and [e.version() for e in engines] == [version + 1] * 2
    assert_same_weights(engines[0].read_weights(), hf_weights(models[2]))


def test_a_failed_pipeline_refit_names_the_cause_and_leaves_the_engines_serving(engines, pp2_policy):
    from megatron_rl.ray_utils import WorkerError

    v = engines[0].version()
    with pytest.raises(WorkerError, match=r"refit start \(engine 0 of 2\).*not newer"):
        pp2_policy.push_hf_weights(engines, v)  # stage 0 cannot open it: no stage exports anything
    assert [e.version() for e in engines] == [v, v]
    assert engines[0].generate([PROMPT], GREEDY)[0][0].weight_version == v
