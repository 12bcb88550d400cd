"""A refit that lands while requests are in flight (async GRPO, generation/inflight.py): the engine pauses
at a token boundary, loads the new weights and finishes the requests it holds; each token carries the
version that sampled it, its engine logprob is that version's (checked against a transformers forward of
each version's weights), and the importance weights built from them use the right one per token.
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
from megatron_rl.models.tiny import save_tiny_checkpoint

PROMPTS = [[3, 89, 87, 73, 86, 203, 21], [3, 27, 15, 22, 25, 35, 4, 203], [5, 6, 7, 8, 9]]
LONG = SamplingSettings(temperature=1.0, max_new_tokens=96, n=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inflight")
    return [str(save_tiny_checkpoint(root / f"m{seed}", "llama", seed=seed)) for seed in range(2)]


def hf_logprobs(model_dir: str, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response token k | prompt + response[:k]) under the checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]


def test_refit_lands_mid_generation(ray_cluster, models):
    from megatron_rl.algorithms.losses import tis_weights
    from megatron_rl.generation.client import EngineClient
    from megatron_rl.grpo.batch import Rollouts

    engine = EngineClient(
        models[0], EngineSettings(max_model_len=256, seed=0), num_cpus=0.5,
        refit=RefitSettings(transport="shm", bucket_mb=1),
    )  # fmt: skip
    try:
        keys = [f"k{i}" for i in range(len(PROMPTS))]
        engine._wait([engine._submit("submit", list(zip(keys, PROMPTS)), LONG)], "submit")
        deadline = time.monotonic() + 60
        while (state := engine._wait([engine._submit("poll")], "poll")[0])["steps"] < 8:
            assert not state["done"] and time.monotonic() < deadline
        asked_at = state["steps"]
        weights = iter(load_file(f"{models[1]}/model.safetensors").items())
        engine.update_weights(weights, version=1)  # while the requests are running
        done: dict = {}
        while len(done) < len(keys) and time.monotonic() < deadline:
            done |= engine._wait([engine._submit("poll")], "poll")[0]["done"]
        assert sorted(done) == keys
        # A later batch call joins the continuous batch and is sampled by version 1 only.
        (later,) = engine.generate([PROMPTS[0]], SamplingSettings(temperature=1.0, max_new_tokens=4))
    finally:
        engine.shutdown()
    assert set(later[0].token_versions) == {1}

    rollouts = Rollouts([], [], [], [], [], LONG.n)
    switched = 0
    for key, prompt in zip(keys, PROMPTS):
        assert len(done[key]) == LONG.n
        for s in done[key]:
            versions = s.token_versions
            assert len(versions) == s.length == len(s.logprobs)
            # Old-weight tokens, then new-weight ones. A sample that drew EOS before the refit landed is
            # all version 0, and it must have ended on a stop.
            switch = versions.index(1) if 1 in versions else s.length
            assert 0 < switch and versions == [0] * switch + [1] * (s.length - switch), versions
            assert switch < s.length or s.finish_reason == "stop", (s.finish_reason, versions)
            # The update takes the engine at the next token boundary: it is not kept waiting while the
            # loop steps on (one to two tokens after the poll here; many, or the whole response, when
            # the loop could take its lock again ahead of the waiting update).
            assert switch == s.length or switch <= asked_at + 6, (switch, asked_at)
            switched += switch < s.length
            assert s.weight_version == 0  # a sample's version is its oldest token's
            engine_lp = torch.tensor(s.logprobs)
            # Each token's engine logprob is the one of the weights that sampled it (the context's KV is
            # recomputed with the new weights when they land).
            old, new = (
                hf_logprobs(models[0], prompt, s.token_ids),
                hf_logprobs(models[1], prompt, s.token_ids),
            )
            torch.testing.assert_close(engine_lp[:switch], old[:switch], atol=2e-4, rtol=0)
            if switch < s.length:
                torch.testing.assert_close(engine_lp[switch:], new[switch:], atol=2e-4, rtol=0)
                assert (old[switch:] - new[switch:]).abs().max() > 0.05  # the two versions differ there
            rollouts.prompt_ids.append(prompt)
            rollouts.response_ids.append(s.token_ids)
            rollouts.engine_logprobs.append(s.logprobs)
            rollouts.token_versions.append(versions)
            rollouts.finish_reasons.append(s.finish_reason)
            rollouts.metadata.append({})
    assert switched >= len(rollouts) // 2, (
        f"only {switched} of {len(rollouts)} samples were running at the refit"
    )
    # The importance weights of training on version-1 weights: 1 on the tokens version 1 sampled,
    # pi_1 / pi_0 on the ones version 0 sampled.
    rollouts.advantages = torch.zeros(len(rollouts))
    for i, seq in enumerate(rollouts.sequences()):
        prompt, response = rollouts.prompt_ids[i], rollouts.response_ids[i]
        trainer = torch.zeros_like(seq["engine_lp"])
        start = len(prompt) - 1
        trainer[start : start + len(response)] = hf_logprobs(models[1], prompt, response)
        w = tis_weights(trainer, seq["engine_lp"], tis_cap=1e9)[start : start + len(response)]
        versions = rollouts.token_versions[i]
        switch = versions.index(1) if 1 in versions else len(versions)
        expected = torch.exp(
            trainer[start : start + switch] - hf_logprobs(models[0], prompt, response)[:switch]
        )
        torch.testing.assert_close(w[:switch], expected, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(w[switch:], torch.ones(len(response) - switch), atol=1e-3, rtol=0)
