"""The vLLM engine in its Ray actor: greedy equals transformers; refit through shared memory and through a
gloo broadcast (new weights change the outputs and the engine's logprobs match a transformers forward on
them); refit from a TP=2 Megatron policy; prefix-cache reset; weight versions; clear, fast errors.

One engine actor serves the whole module (its startup is the expensive part). The test that kills it runs
last (pytest keeps file order).
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
from megatron_rl.generation.metrics import token_mult_prob_error
from megatron_rl.models.tiny import save_tiny_checkpoint

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, n=1)
PROMPT = [3, 89, 87, 73, 86, 203, 21, 27, 15, 22, 25, 35, 4, 203, 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return [str(save_tiny_checkpoint(root / f"m{seed}", "llama", seed=seed)) for seed in range(3)]


@pytest.fixture(scope="module")
def engine(ray_cluster, models):
    from megatron_rl.generation.client import EngineClient

    # 256 KiB buckets and 2 slots: the tiny model (2.8 MB) takes 11 buckets, layers straddle them, and each
    # slot is refilled while the engine may still hold views of it.
    client = EngineClient(
        models[0],
        EngineSettings(max_model_len=512, seed=0),
        num_cpus=0.5,
        refit=RefitSettings(transport="shm", bucket_mb=0.25, slots=2),
    )
    yield client
    client.shutdown()


def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: str, prompt: list[int], n: int) -> list[int]:
    out = hf_model(model_dir).generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def hf_weights(model_dir: str):
    """The checkpoint as a lazy (hf_name, tensor) stream, as a policy's exporter would produce it."""
    return iter(load_file(f"{model_dir}/model.safetensors").items())


def test_sampling_settings(engine):
    """n samples per prompt, seeds reproduce, top_k=1 is greedy, stop strings and EOS end with "stop"."""
    base = SamplingSettings(temperature=1.0, max_new_tokens=40, n=4, seed=11)
    first, again = engine.generate([PROMPT, PROMPT[:5]], base), engine.generate([PROMPT], base)[0]
    assert [len(group) for group in first] == [4, 4]
    assert [s.token_ids for s in again] == [s.token_ids for s in first[0]]
    assert len({tuple(s.token_ids) for s in again}) == 4
    assert any(s.finish_reason == "stop" and s.length < 40 for s in again)  # sampled the EOS token
    top1 = SamplingSettings(temperature=1.0, top_k=1, max_new_tokens=12, seed=5)
    assert (
        engine.generate([PROMPT], top1)[0][0].token_ids == engine.generate([PROMPT], GREEDY)[0][0].token_ids
    )
    stopped = engine.generate([PROMPT], SamplingSettings(**{**base.__dict__, "stop": ["A"]}))[0]
    assert any("A" in s.text for s in again)
    for full, cut in zip(again, stopped):
        if "A" in full.text:
            assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index("A")]
        else:
            assert cut.token_ids == full.token_ids


def test_large_seeded_batch_is_generated_in_waves(engine):
    """600 seeded requests exceed one scheduler step (token budget and max_num_seqs). vLLM would chunk some
    prefills and then rewind their generators, which CPU generators cannot do; the engine splits the batch
    instead. Each prompt has its own seed (from the call's seed and its index), so the split changes
    nothing, and identical prompts still get samples of their own."""
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=4, n=2, seed=3)
    prompt = PROMPT * 4  # 60 tokens: 256 admitted sequences need ~15k prefill tokens in one step
    few = engine.generate([prompt] * 3, sampling)
    crowd = engine.generate([prompt] * 300, sampling)
    assert len(crowd) == 300 and all(len(group) == 2 for group in crowd)
    assert [[s.token_ids for s in g] for g in crowd[:3]] == [[s.token_ids for s in g] for g in few]
    distinct = {tuple(s.token_ids) for group in crowd for s in group}
    assert len(distinct) > 500, len(distinct)


def straddling_layers(weights, bucket_bytes: int) -> set[str]:
    """vLLM layers (q/k/v fused into qkv_proj, gate/up into gate_up_proj) whose tensors land in two buckets."""
    from megatron_rl.generation.buckets import iter_buckets

    seen: dict[str, set[int]] = {}
    for i, bucket in enumerate(iter_buckets(weights, bucket_bytes)):
        for name, _ in bucket:
            layer = re.sub(
                r"\.(q|k|v)_proj\.", ".qkv_proj.", re.sub(r"\.(gate|up)_proj\.", ".gate_up_proj.", name)
            )
            seen.setdefault(layer, set()).add(i)
    return {layer for layer, where in seen.items() if len(where) > 1}


def assert_engine_matches(engine, model_dir: str, version: int) -> None:
    """Greedy equals transformers' greedy; sampled tokens' logprobs match a transformers forward."""
    greedy = engine.generate([PROMPT], GREEDY)[0][0]
    assert greedy.weight_version == version
    assert greedy.token_ids == hf_greedy(model_dir, PROMPT, len(greedy.token_ids))
    samples = engine.generate([PROMPT], SamplingSettings(temperature=1.0, max_new_tokens=16, n=4, seed=7))[0]
    assert all(s.weight_version == version for s in samples)
    model = hf_model(model_dir)
    policy_lp, engine_lp = [], []
    for s in samples:
        ids = torch.tensor([PROMPT + s.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        policy_lp.append(logp[len(PROMPT) - 1 :].gather(1, ids[0, len(PROMPT) :, None])[:, 0])
        engine_lp.append(torch.tensor(s.logprobs))
    lp, elp = torch.cat(policy_lp), torch.cat(engine_lp)
    err = token_mult_prob_error(lp, elp, torch.ones_like(lp))
    assert 1.0 <= err <= 1.001, err


def test_greedy_matches_transformers(engine, models):
    sample = engine.generate([PROMPT], GREEDY)[0][0]
    assert sample.weight_version == 0 and sample.length == 12 and sample.finish_reason == "length"
    assert sample.token_ids == hf_greedy(models[0], PROMPT, 12)


# fp32 logprobs of the same tokens from a tp=2 and a tp=1 engine differ only by the order of the tp
# all-reduce's sums (docs/generation.md has the measured difference).
TP_LOGPROB_TOLERANCE = 1e-4


def test_tp2_engine_refits_and_generates_like_tp1(engine, models):
    """A tp=2 engine (two vLLM workers under the multiprocess executor, children of the engine's actor),
    refitted through shared memory and then through a gloo broadcast from another process: both workers
    receive every bucket and load their shard, and it generates what the module's tp=1 engine generates
    with the same weights. Runs while that engine still serves models[0] at version 0."""
    import ray

    from megatron_rl.generation.client import EngineClient

    assert engine.version() == 0
    tp2 = EngineClient(
        models[1], EngineSettings(tp=2, max_model_len=512, seed=0), num_cpus=0.5, refit=engine.refit
    )
    try:
        own = tp2.generate([PROMPT], GREEDY)[0][0].token_ids
        stats = tp2.update_weights(hf_weights(models[0]), version=1)
        assert stats["transport"] == "shm" and stats["missing"] == [] and stats["tensors"] == 39
        assert stats["engines"][0]["workers"] == 2 and stats["engines"][0]["tensors"] == 39  # each worker
        prompts = [PROMPT, PROMPT[:6]]
        got, want = tp2.generate(prompts, GREEDY), engine.generate(prompts, GREEDY)
        for mine, theirs in zip(got, want):
            assert mine[0].weight_version == 1 and mine[0].token_ids == theirs[0].token_ids
            diff = (torch.tensor(mine[0].logprobs) - torch.tensor(theirs[0].logprobs)).abs().max().item()
            assert diff <= TP_LOGPROB_TOLERANCE, diff
        rank0 = ray.remote(num_cpus=0.1)(TrainerRank).remote()
        try:
            stats = ray.get(rank0.push.remote(tp2, models[1], 2, "broadcast"), timeout=120)
        finally:
            ray.kill(rank0)
        assert stats["transport"] == "broadcast" and stats["missing"] == []
        assert stats["engines"][0]["workers"] == 2 and stats["engines"][0]["tensors"] == 39
        back = tp2.generate([PROMPT], GREEDY)[0][0]
        assert tp2.version() == 2 and back.weight_version == 2
        assert back.token_ids == own != got[0][0].token_ids
    finally:
        tp2.shutdown()


def test_refit_through_shared_memory(engine, models):
    # Layers split across buckets must survive the sender refilling the first bucket's slot.
    assert straddling_layers(hf_weights(models[1]), int(engine.refit.bucket_mb * 2**20))
    before = engine.generate([PROMPT], GREEDY)[0][0]
    stats = engine.update_weights(hf_weights(models[1]), version=before.weight_version + 1)
    assert stats["transport"] == "shm" and stats["missing"] == [] and stats["tensors"] == 39
    assert stats["bytes"] == sum(t.numel() * 4 for _, t in hf_weights(models[1]))
    after = engine.generate([PROMPT], GREEDY)[0][0]
    assert after.token_ids != before.token_ids
    assert_engine_matches(engine, models[1], before.weight_version + 1)


class TrainerRank:
    """Stands in for the policy's rank 0: another process, handed the (pickled) engine client."""

    def push(self, engine, model_dir: str, version: int, transport: str) -> dict:
        return engine.update_weights(hf_weights(model_dir), version=version, transport=transport)


def test_refit_through_gloo_broadcast_from_another_process(engine, models):
    import ray

    rank0 = ray.remote(num_cpus=0.1)(TrainerRank).remote()
    try:
        version = engine.version() + 1
        stats = ray.get(rank0.push.remote(engine, models[2], version, "broadcast"), timeout=120)
    finally:
        ray.kill(rank0)
    assert stats["transport"] == "broadcast" and stats["missing"] == [] and stats["tensors"] == 39
    assert_engine_matches(engine, models[2], version)


@pytest.mark.parametrize("transport", ["auto", "files"])
def test_refit_from_tp2_policy(engine, ray_cluster, models, transport):
    """The real trainer path: a TP=2 (+SP) Megatron policy exports HF weights gathered over TP; rank 0
    streams them into the engine (auto: shared-memory slots on CPU) or the ranks write bucket files."""
    from megatron_rl.grpo.policy_group import PolicyGroup
    from megatron_rl.grpo.policy_worker import PolicySpec
    from megatron_rl.parallel import ParallelConfig

    spec = PolicySpec(models[1], ParallelConfig(tp=2, sequence_parallel=True))
    policy = PolicyGroup(spec, 2, gpus_per_rank=0, cpus_per_rank=0.5)
    try:
        version = engine.version() + 1
        stats = engine.refit_from(policy, version=version, bucket_mb=1, transport=transport)
        assert stats["bytes"] > 0 and stats["missing"] == []
        assert stats["transport"] == ("files" if transport == "files" else "shm")
        sampled = engine.generate(
            [PROMPT], SamplingSettings(temperature=1.0, max_new_tokens=12, n=4, seed=3)
        )[0]
        assert all(s.weight_version == version for s in sampled)
        seqs = []
        for s in sampled:
            ids = torch.tensor(PROMPT + s.token_ids)
            resp = torch.zeros(len(ids) - 1)
            resp[len(PROMPT) - 1 :] = 1
            engine_lp = torch.zeros(len(ids) - 1)
            engine_lp[len(PROMPT) - 1 :] = torch.tensor(s.logprobs)
            seqs.append({"ids": ids, "resp": resp, "engine_lp": engine_lp})
        policy_lp = torch.cat(policy.logprobs(seqs))
        mask = torch.cat([s["resp"] for s in seqs])
        err = token_mult_prob_error(policy_lp, torch.cat([s["engine_lp"] for s in seqs]), mask)
        assert 1.0 <= err <= 1.001, err
    finally:
        policy.shutdown()
    assert engine.generate([PROMPT], GREEDY)[0][0].token_ids == hf_greedy(models[1], PROMPT, 12)


def test_prefix_cache_reset_matters(engine, models):
    """A long prompt fills whole KV blocks that vLLM caches. Reloading weights without resetting the cache
    serves those stale blocks (the continuation is not the new model's); with the reset it is."""
    long_prompt = (PROMPT * 30)[:400]
    v = engine.version()
    engine.update_weights(hf_weights(models[0]), version=v + 1)
    engine.generate([long_prompt], GREEDY)  # caches the prompt's blocks under weights 0
    fresh = hf_greedy(models[1], long_prompt, 12)
    engine.update_weights(hf_weights(models[1]), version=v + 2, reset_prefix_cache=False)
    stale = engine.generate([long_prompt], GREEDY)[0][0]
    assert stale.token_ids != fresh
    engine.update_weights(hf_weights(models[1]), version=v + 3)  # with the reset
    served = engine.generate([long_prompt], GREEDY)[0][0]
    assert served.token_ids == fresh and served.weight_version == v + 3


def test_versions_must_increase_and_bad_weights_are_named(engine, models):
    from megatron_rl.ray_utils import WorkerError

    v = engine.version()
    with pytest.raises(WorkerError, match=f"weight version {v} is not newer"):
        engine.update_weights(hf_weights(models[1]), version=v)
    bogus = iter([("model.layers.0.no_such_proj.weight", torch.zeros(4, 4))])
    with pytest.raises(WorkerError, match="no_such_proj"):
        engine.update_weights(bogus, version=v + 1)
    # The failed update was closed: the engine still serves, at the old version.
    sample = engine.generate([PROMPT], GREEDY)[0][0]
    assert sample.weight_version == v and engine.version() == v


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC refit needs a CUDA GPU")
def test_refit_through_cuda_ipc(ray_cluster, models):
    from megatron_rl.generation.client import EngineClient

    client = EngineClient(
        models[0],
        EngineSettings(max_model_len=512),
        num_cpus=1,
        num_gpus=0.4,
        refit=RefitSettings("cuda_ipc"),
    )
    try:
        weights = ((n, t.cuda()) for n, t in hf_weights(models[1]))
        assert client.update_weights(weights, version=1)["missing"] == []
        assert client.generate([PROMPT], GREEDY)[0][0].token_ids == hf_greedy(models[1], PROMPT, 12)
    finally:
        client.shutdown()


def test_missing_model_fails_at_once(ray_cluster, tmp_path):
    from megatron_rl.errors import UserError
    from megatron_rl.generation.client import EngineClient

    start = time.perf_counter()
    with pytest.raises(UserError, match="no model at .*missing"):
        EngineClient(str(tmp_path / "missing"), EngineSettings())
    assert time.perf_counter() - start < 1


def test_engine_that_cannot_start_reports_the_cause(ray_cluster, tmp_path, models):
    import json
    import shutil

    from megatron_rl.errors import UserError
    from megatron_rl.generation.client import EngineClient

    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"vLLM rejected the model at .*broken.*NoSuchForCausalLM"):
        EngineClient(str(broken), EngineSettings(max_model_len=256), num_cpus=0.1, timeout_s=120)
    assert time.perf_counter() - start < 90


def test_engine_killed_mid_generation_raises_quickly(engine):
    """Runs last: it kills the module's engine while a long generation is in flight."""
    import ray

    from megatron_rl.ray_utils import WorkerError

    killer = threading.Timer(1.0, lambda: ray.kill(engine.actor))
    killer.start()
    start = time.perf_counter()
    with pytest.raises(WorkerError, match="generation engine: generation: a worker process died"):
        engine.generate([PROMPT] * 64, SamplingSettings(temperature=1.0, max_new_tokens=400, n=4, seed=0))
    assert time.perf_counter() - start < 30
    killer.join()


def test_refit_with_tied_embeddings(ray_cluster, tmp_path):
    """SmolLM2, Llama-3.2-1B and small Qwen models share the input embedding and the output head: a refit
    must update both (vLLM keeps one parameter for the two)."""
    from megatron_rl.generation.client import EngineClient

    tied = [
        str(save_tiny_checkpoint(tmp_path / f"t{seed}", "llama", seed=seed, tie_word_embeddings=True))
        for seed in range(2)
    ]
    client = EngineClient(
        tied[0], EngineSettings(max_model_len=512, seed=0), num_cpus=0.5, refit=RefitSettings("shm", 0.25)
    )
    try:
        stats = client.update_weights(hf_weights(tied[1]), version=1)
        assert stats["missing"] == []
        assert_engine_matches(client, tied[1], 1)
    finally:
        client.shutdown()
