"""vLLM engine in a Ray actor: greedy equals transformers, refit from a TP=2 Megatron policy, prefix-cache
reset, weight versions, and clear errors for an engine that cannot start or dies."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.generation.base import EngineSettings, SamplingSettings, token_mult_prob_error
from megatron_rl.models.tiny import save_tiny_checkpoint

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, n=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return str(save_tiny_checkpoint(root / "a", "llama", seed=0)), str(
        save_tiny_checkpoint(root / "b", "llama", seed=1)
    )


@pytest.fixture(scope="module")
def engine(ray_cluster, models):
    from megatron_rl.generation.client import EngineClient

    client = EngineClient(models[0], EngineSettings(max_model_len=512, seed=0), num_cpus=0.5)
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def policy(ray_cluster, models):
    from megatron_rl.grpo.policy_group import PolicyGroup
    from megatron_rl.grpo.policy_worker import PolicySpec
    from megatron_rl.parallel import ParallelConfig

    group = PolicyGroup(
        PolicySpec(models[1], ParallelConfig(tp=2, sequence_parallel=True)),
        2,
        gpus_per_rank=0,
        cpus_per_rank=0.5,
    )
    yield group
    group.shutdown()


def hf_greedy(model_dir: str, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


PROMPT = [3, 89, 87, 73, 86, 203, 21, 27, 15, 22, 25, 35, 4, 203, 3]


def test_greedy_matches_transformers(engine, models):
    sample = engine.generate([PROMPT], SamplingSettings(temperature=0.0, max_new_tokens=12, n=1))[0][0]
    assert sample.token_ids == hf_greedy(models[0], PROMPT, len(sample.token_ids))


def test_refit_from_tp2_policy_changes_outputs_and_matches_policy_logprobs(engine, policy, models):
    before = engine.generate([PROMPT], GREEDY)[0][0]
    version = before.weight_version + 1
    timing = engine.refit_from(policy, version=version, bucket_mb=1)  # tiny buckets: several files
    assert timing["bytes"] > 0
    sampled = engine.generate([PROMPT], SamplingSettings(temperature=1.0, max_new_tokens=12, n=4, seed=3))[0]
    after = engine.generate([PROMPT], GREEDY)[0][0]
    assert after.weight_version == version and all(s.weight_version == version for s in sampled)
    assert after.token_ids != before.token_ids
    assert after.token_ids == hf_greedy(models[1], PROMPT, len(after.token_ids))
    seqs = []
    for s in sampled:
        ids = torch.tensor(PROMPT + s.token_ids)
        resp = torch.zeros(len(ids) - 1)
        resp[len(PROMPT) - 1 :] = 1
        engine_lp = torch.zeros(len(ids) - 1)
        engine_lp[len(PROMPT) - 1 :] = torch.tensor(s.logprobs)
        seqs.append({"ids": ids, "resp": resp, "engine_lp": engine_lp})
    policy_lp = policy.logprobs(seqs)
    err = token_mult_prob_error(
        torch.cat(policy_lp), torch.cat([s["engine_lp"] for s in seqs]), torch.cat([s["resp"] for s in seqs])
    )
    assert 1.0 <= err <= 1.001


def test_prefix_cache_reset_matters(engine, models):
    """A long prompt fills whole KV blocks that vLLM caches. Reloading weights without resetting the cache
    serves those stale blocks: the continuation is neither the old nor the new model's."""
    from safetensors.torch import load_file

    long_prompt = (PROMPT * 30)[:400]
    weights_a = list(load_file(f"{models[0]}/model.safetensors").items())
    weights_b = list(load_file(f"{models[1]}/model.safetensors").items())
    engine.update_weights(weights_a, version=10)
    engine.generate([long_prompt], GREEDY)  # caches the prompt's blocks under weights A
    fresh_b = hf_greedy(models[1], long_prompt, 12)
    engine.update_weights(weights_b, version=11, reset_prefix_cache=False)
    stale = engine.generate([long_prompt], GREEDY)[0][0].token_ids
    assert stale != fresh_b
    engine.update_weights(weights_b, version=12)  # with the reset
    assert engine.generate([long_prompt], GREEDY)[0][0].token_ids == fresh_b


def test_engine_that_cannot_start_fails_fast(ray_cluster, tmp_path):
    from megatron_rl.errors import UserError
    from megatron_rl.generation.client import EngineClient

    with pytest.raises(UserError, match="no model at"):
        EngineClient(str(tmp_path / "missing"), EngineSettings(), num_cpus=0.1, timeout_s=120)


def test_dead_engine_gives_a_clear_error(ray_cluster, models):
    from megatron_rl.generation.client import EngineClient
    from megatron_rl.grpo.ray_utils import WorkerError

    client = EngineClient(models[0], EngineSettings(max_model_len=256), num_cpus=0.1)
    client.shutdown()  # the actor is gone, as after a crash
    with pytest.raises(WorkerError, match="generation: a worker process died"):
        client.generate([PROMPT], GREEDY)
