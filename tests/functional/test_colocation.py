"""Colocation as far as a CPU can show it: the GRPO loop's hand-overs (megatron_rl.colocation.TimeShare) on a
real vLLM engine group and a real two-rank Megatron policy (bf16, distributed optimizer over dp=2).

vLLM has no sleep mode on CPU, so the two calls into it (VLLMEngine._sleep and VLLMEngine._wake_up, i.e.
LLM.sleep and LLM.wake_up) are replaced in the live engine actors by stand-ins that record each call with
the engine's weight version; everything around them (the engine's sleep state and its guards, the group's
fan-out and restarts, refits, generation, the policy's offload) is the real code. The GPU-only part (memory
actually released by vLLM) is `python -m megatron_rl.bench gpu-check`'s sleep_wake check.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
from megatron_rl.models.tiny import save_tiny_checkpoint
from megatron_rl.ray_utils import WorkerError, gather

PROMPTS = [[3, 89, 87, 73, 86, 203, 21], [3, 89, 87, 73, 86, 203, 27, 15]]
SAMPLING = SamplingSettings(temperature=1.0, max_new_tokens=8, n=2, seed=5)
LEVEL = 2


def install_stand_in(client, level: int) -> None:
    """Replaces the engine's two vLLM sleep-mode calls with recorders (see the module docstring)."""

    def install(engine, level):
        engine.stand_in_events = []
        engine.settings.sleep_level = level  # the engine starts without sleep mode: CPU refuses it

        def sleep(lvl):
            engine.stand_in_events.append(("sleep", lvl, engine.version))

        def wake_up(tags):
            engine.stand_in_events.append(("wake", tuple(tags), engine.version))

        engine._sleep, engine._wake_up = sleep, wake_up

    gather([client.actor.__ray_call__.remote(install, level)], "installing the sleep stand-in", 60)


def events(client) -> list[tuple]:
    return gather([client.actor.__ray_call__.remote(lambda e: e.stand_in_events)], "events", 60)[0]


def state_sizes(worker) -> dict[str, int]:
    """Bytes held by the optimizer's own storages (not the model's) and by the grad buffers, on one rank."""
    from megatron_rl.policy.offload import grad_buffers, optimizer_tensors

    pol = worker.policy
    model = {p.untyped_storage().data_ptr() for _, p in pol.named_parameters()}
    own = {
        id(t.untyped_storage()): t.untyped_storage().nbytes()
        for t in optimizer_tensors(pol.optimizer)
        if t.untyped_storage().data_ptr() not in model
    }
    return {
        "optimizer": sum(own.values()),
        "optimizer_storages": len(own),
        "grads": sum(g.untyped_storage().nbytes() for g in grad_buffers(pol.model)),
    }


def state_values(worker) -> dict[str, list[torch.Tensor]]:
    from megatron_rl.policy.offload import grad_buffers, optimizer_tensors

    pol = worker.policy
    return {
        "optimizer": [t.detach().clone() for t in optimizer_tensors(pol.optimizer)],
        "grads": [g.detach().clone() for g in grad_buffers(pol.model)],
    }


def on_ranks(policy, fn) -> list:
    return gather([w.__ray_call__.remote(fn) for w in policy.workers], "inspecting the ranks", 120)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("colocation") / "m", "llama", seed=0))


@pytest.fixture(scope="module")
def parts(ray_cluster, model):
    from megatron_rl.config.compose import compose
    from megatron_rl.generation.client import EngineClient
    from megatron_rl.generation.group import EngineGroup
    from megatron_rl.grpo.policy_group import PolicyGroup
    from megatron_rl.grpo.policy_worker import PolicySpec
    from megatron_rl.policy.optim import OptimConfig

    def start(index: int) -> EngineClient:
        client = EngineClient(
            model,
            EngineSettings(max_model_len=256, seed=0, dtype="bfloat16"),
            num_cpus=0.5,
            refit=RefitSettings(transport="shm", bucket_mb=1),
            log_name=f"engine{index}",
        )
        install_stand_in(client, LEVEL)  # a restarted engine gets it too
        return client

    group = EngineGroup(start, num_engines=1, max_failures=1, timeout_s=120, sleep_level=LEVEL)
    spec = PolicySpec(model, dtype="bf16", optim=OptimConfig(lr=1e-3))
    policy = PolicyGroup(spec, 2, gpus_per_rank=0, cpus_per_rank=0.5)
    cfg = compose("tiny", ["policy.offload_during_generation=optimizer_and_grads"])
    yield cfg, group, policy
    policy.shutdown()
    group.shutdown()


def sequences(samples) -> list[dict]:
    seqs = []
    for prompt, per_prompt in zip(PROMPTS, samples):
        for i, s in enumerate(per_prompt):
            ids = torch.tensor(prompt + s.token_ids)
            mask = torch.zeros(len(ids) - 1)
            mask[len(prompt) - 1 :] = 1
            engine_lp = torch.zeros(len(ids) - 1)
            engine_lp[len(prompt) - 1 :] = torch.tensor(s.logprobs)
            seqs.append({"ids": ids, "mask": mask, "resp": mask, "engine_lp": engine_lp, "adv": i - 0.5})
    return seqs


def test_hand_overs_in_the_order_vllm_needs_and_the_policy_state_leaves(parts):
    from megatron_rl.colocation import TimeShare

    cfg, group, policy = parts
    share = TimeShare(cfg, policy)  # offloads at once: the engines start beside what stays
    assert share.offload == "optimizer_and_grads"
    assert all(s["optimizer"] == 0 and s["grads"] == 0 for s in on_ranks(policy, state_sizes))
    share.use(group)
    assert share.sleeps
    for step in (1, 2):  # the synchronous loop of grpo/driver.py
        seqs = sequences(group.generate(PROMPTS, SAMPLING))
        metrics: dict[str, float] = {}
        share.before_training(metrics)
        with pytest.raises(WorkerError, match=r"generate\(\) while the engine sleeps"):
            group.generate(PROMPTS, SAMPLING)
        assert all(s["optimizer"] > 0 and s["grads"] > 0 for s in on_ranks(policy, state_sizes))
        for seq, lp in zip(seqs, policy.logprobs(seqs)):
            seq["old_lp"] = lp
        train = policy.train(seqs, "clipped_pg", {})
        assert torch.isfinite(torch.tensor(train["loss"]))
        share.before_refit(metrics)
        # Offloaded: every optimizer storage of its own (Adam moments, fp32 main shards) and the grad
        # buffers hold no bytes until the next train step.
        sizes = on_ranks(policy, state_sizes)
        assert all(s["optimizer_storages"] >= 3 and s["optimizer"] == 0 and s["grads"] == 0 for s in sizes)
        assert metrics["memory/policy_offloaded_gb"] > 0
        group.refit_from(policy, version=step)
        share.after_refit(metrics)
        assert {"timing/sleep_s", "timing/wake_s", "timing/onload_s", "timing/offload_s"} <= metrics.keys()
        assert "memory/engine_freed_gb" not in metrics  # CPU: no device memory to measure
    assert group.generate(PROMPTS, SAMPLING)[0][0].weight_version == 2
    # Level 2 discarded the weights: woken without a refit, the engine refuses to generate with them.
    group.sleep()
    group.wake_up()
    with pytest.raises(WorkerError, match="discarded the weights: refit the engine"):
        group.generate(PROMPTS, SAMPLING)
    group.refit_from(policy, version=3)
    assert group.generate(PROMPTS, SAMPLING)[0][0].weight_version == 3
    # Per step: sleep after generation; the weights wake before the refit (the old version), the KV
    # cache after it (the new one).
    assert events(group.engines[0]) == [
        ("sleep", LEVEL, 0),
        ("wake", ("weights",), 0),
        ("wake", ("kv_cache",), 1),
        ("sleep", LEVEL, 1),
        ("wake", ("weights",), 1),
        ("wake", ("kv_cache",), 2),
        ("sleep", LEVEL, 2),
        ("wake", ("weights", "kv_cache"), 2),
    ]


def test_offload_round_trip_is_bit_exact(parts):
    _, _, policy = parts
    policy.onload()  # the loop above left it offloaded (reading a freed storage would crash the rank)
    before = on_ranks(policy, state_values)
    policy.offload("optimizer_and_grads")
    assert all(s["optimizer"] == 0 and s["grads"] == 0 for s in on_ranks(policy, state_sizes))
    policy.onload()
    after = on_ranks(policy, state_values)
    for b, a in zip(before, after):
        assert len(b["optimizer"]) == len(a["optimizer"]) > 0
        assert all(torch.equal(x, y) for x, y in zip(b["optimizer"], a["optimizer"]))
        assert all(not g.any() for g in a["grads"])  # the next train step zeroes them first anyway


def test_a_restarted_engine_joins_in_the_groups_sleep_state(parts):
    _, group, policy = parts
    group.sleep()
    victim = group.engines[0]
    os.kill(victim.info["pid"], signal.SIGKILL)
    group.wake_up(["weights"])  # finds it dead: restarts it, sleeps and wakes it as the group, refits it
    fresh = group.engines[0]
    assert group.restarts == 1 and fresh is not victim
    assert events(fresh) == [("sleep", LEVEL, 0), ("wake", ("weights",), 0)]
    assert fresh.version() == group.weight_version == 3  # refitted after its weights woke
    assert gather([fresh.actor.asleep.remote()], "asleep", 60)[0] == ["kv_cache"]
    group.wake_up(["kv_cache"])
    assert group.generate(PROMPTS, SAMPLING)[1][0].weight_version == 3
