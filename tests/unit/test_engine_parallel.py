"""Engine parallelism's arithmetic and checks (generation/engine_parallel.py), without starting vLLM."""

from __future__ import annotations

import pytest

from megatron_rl.errors import UserError
from megatron_rl.generation import engine_parallel as ep
from megatron_rl.generation.base import EngineSettings


def test_executor_is_in_process_for_one_worker_ray_only_for_placed_workers():
    assert ep.executor_backend(1, ray_workers=False) is None
    assert ep.executor_backend(2, ray_workers=False) == "mp"
    assert ep.executor_backend(16, ray_workers=True) == "ray"
    assert EngineSettings(tp=8, pp=2).world == 16


def test_vllm_kwargs_name_every_dimension():
    assert ep.vllm_kwargs(8, 2, True, "ray") == {
        "tensor_parallel_size": 8,
        "pipeline_parallel_size": 2,
        "enable_expert_parallel": True,
        "distributed_executor_backend": "ray",
    }
    assert ep.vllm_kwargs(1, 1, False, None) == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}


def test_cpu_workers_get_disjoint_cpus_or_share_them_with_one_thread_each():
    assert ep.cpu_thread_binding(2, [0, 1]) == "0|1"
    assert ep.cpu_thread_binding(2, [4, 5, 6, 7, 8]) == "4,5|6,7"
    assert ep.cpu_thread_binding(4, [0, 1]) == "nobind"
    assert ep.cpu_worker_env(1) == {}


def test_a_refit_is_as_complete_as_its_least_complete_worker():
    w0 = {"tensors": 39, "missing": [], "bytes": 10, "load_s": 1.0}
    w1 = {"tensors": 38, "missing": ["model.norm.weight"], "bytes": 10, "load_s": 2.0}
    merged = ep.merge_worker_stats([w0, w1])
    assert merged["missing"] == ["model.norm.weight"] and merged["tensors"] == 38 and merged["workers"] == 2
    assert merged["bytes"] == 10  # worker 0's figures otherwise


def test_what_vllm_cpu_cannot_run_is_refused_on_cpu():
    from megatron_rl import platform

    if not platform.use_cpu():
        pytest.skip("CPU-only refusals")
    moe = {"num_experts": 4}
    with pytest.raises(UserError, match=r"generation.expert_parallel=true: vLLM's CPU build crashes"):
        ep.check("/m", moe, EngineSettings(tp=2, expert_parallel=True))
    with pytest.raises(UserError, match=r"generation.pp=2: vLLM's CPU build"):
        ep.check("/m", moe, EngineSettings(pp=2))
    with pytest.raises(UserError, match=r"Ray executor, which vLLM's CPU build does not support"):
        ep.check("/m", moe, EngineSettings(tp=2, executor="ray"))
    ep.check("/m", moe, EngineSettings(tp=2))
    ep.check("/m", moe, EngineSettings(expert_parallel=True))  # one worker: nothing to shard, allowed


def test_expert_parallel_needs_experts_and_names_the_model():
    dense = {"architectures": ["LlamaForCausalLM"]}
    with pytest.raises(
        UserError, match=r"expert_parallel=true needs a mixture-of-experts model; LlamaForCausalLM"
    ):
        ep.check("/m", dense, EngineSettings(expert_parallel=True))
    for moe in ({"num_experts": 128}, {"num_local_experts": 8}, {"n_routed_experts": 256}):
        ep.check("/m", moe, EngineSettings(expert_parallel=True))
        assert ep.num_experts(moe) > 0
    assert ep.num_experts(dense) == 0
