"""The trainer's handle on a vLLM engine living in a Ray actor of its own (one actor per engine).

Every call waits with a deadline and turns a dead actor or a failure inside it into an error that names the
phase and the cause (ray_utils.gather), so a crashed engine never hangs the trainer. The handle pickles:
a policy rank can receive it and stream its exported weights straight into the engine.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from megatron_rl import console, platform
from megatron_rl.generation import engine_parallel, fanout, transports
from megatron_rl.generation.base import (
    EngineSettings,
    GenerationEngine,
    RefitSettings,
    Sample,
    SamplingSettings,
)
from megatron_rl.generation.vllm_engine import VLLMEngine, check_model_dir
from megatron_rl.models.hf_config import load_hf_config
from megatron_rl.placement import EngineResources
from megatron_rl.rank_actors import placed_on
from megatron_rl.ray_utils import actor_env, gather, remote_class

# glibc returns large freed blocks to the OS and faults fresh pages in on the next allocation. A CPU refit
# re-materialises every layer each time, so that churn is a large share of a refit's CPU time (figures in
# docs/generation.md); keeping the blocks in the heap lets every refit reuse warm pages.
CPU_ENGINE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


class EngineActor(VLLMEngine):
    """The engine as a Ray actor: adds where it runs, for choosing a transport."""

    def __init__(self, model_dir: str, settings: EngineSettings, log_name: str = "engine") -> None:
        # First of all: vLLM's chatter, C++ included, goes to <run>/logs/<log_name>.log.
        console.redirect_to_log(log_name)
        super().__init__(model_dir, settings)

    def start(self) -> dict[str, Any]:
        import ray

        info = super().start()
        return {**info, "node_id": ray.get_runtime_context().get_node_id(), "device_uuid": self.device_uuid()}

    def where(self) -> dict[str, Any]:
        """Where Ray put this engine: its node and GPUs, before (and without) starting vLLM."""
        return placed_on()


def engine_actor_options(
    num_cpus: float, num_gpus: float, resources: EngineResources | None = None
) -> dict[str, Any]:
    """The engine actor's Ray options: its resources (placement group included, from `resources` when
    given) and its process's env. `launch plan --placement` places the engine with these very options."""
    if resources is not None:
        options, env = dict(resources.options), dict(resources.env)
        on_gpu = options["num_gpus"] > 0 or bool(resources.workers)
    else:
        options, env, on_gpu = {"num_cpus": num_cpus, "num_gpus": num_gpus}, {}, num_gpus > 0
    # glibc reads these at process start, hence the actor's runtime env (a user's own values win).
    if not on_gpu:
        env |= {k: os.environ.get(k, v) for k, v in CPU_ENGINE_ENV.items()}
    if env:  # a runtime env of the actor's own replaces remote_class's: the console settings come along
        options["runtime_env"] = {"env_vars": env | actor_env()}
    return options


class EngineClient(GenerationEngine):
    def __init__(
        self,
        model_dir: str,
        settings: EngineSettings,
        num_cpus: float = 1,
        num_gpus: float = 0,
        timeout_s: float = 600,
        refit: RefitSettings | None = None,
        log_name: str = "engine",
        resources: EngineResources | None = None,
    ) -> None:
        """`resources` (megatron_rl.placement.engine_resources) places it: in the policy's placement group
        (colocated) or its own; without it, a plain actor of `num_cpus` CPUs and `num_gpus` GPUs."""
        import ray

        check_model_dir(model_dir)  # before any process starts: the clearest error, at once
        if resources is not None and resources.workers:
            # Its GPUs are Ray workers in its bundles (an engine spanning nodes): vLLM's Ray executor.
            settings = dataclasses.replace(settings, executor="ray")
        engine_parallel.check(model_dir, load_hf_config(model_dir), settings)
        self.model_dir, self.settings, self.timeout_s = model_dir, settings, timeout_s
        self.refit = refit or RefitSettings()
        self.resources = resources
        options = engine_actor_options(num_cpus, num_gpus, resources)
        self.on_gpu = options["num_gpus"] > 0 or bool(resources and resources.workers)
        cls = remote_class(EngineActor)
        self.log_name = log_name
        self.actor = cls.options(**options).remote(model_dir, settings, log_name)
        self.actor_id = self.actor._actor_id.hex()
        try:
            self.info = self._wait([self.actor.start.remote()], f"starting from {model_dir}")[0]
        except BaseException:
            ray.kill(self.actor)
            if resources is not None:
                resources.release()
            raise

    def _submit(self, method: str, *args: Any) -> Any:
        return getattr(self.actor, method).remote(*args)

    def _wait(self, refs: list[Any], phase: str, timeout_s: float | None = None) -> list[Any]:
        return gather(refs, f"generation engine: {phase}", timeout_s or self.timeout_s)

    def _abort_refit(self) -> None:
        try:
            self._wait([self._submit("abort_refit")], "aborting a weight update", 60)
        except Exception:  # noqa: BLE001 - the original failure is the one worth reporting
            pass

    # GenerationEngine

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        return self._wait([self._submit("generate", prompts, sampling)], "generation")[0]

    def transport(self) -> str:
        """The transport `auto` resolves to from this process."""
        if self.refit.transport != "auto":
            return self.refit.transport
        import ray

        if ray.get_runtime_context().get_node_id() != self.info["node_id"]:
            return "broadcast"
        mine = platform.gpu_uuid()
        if mine and self.info.get("device_uuid"):
            return "cuda_ipc" if mine == self.info["device_uuid"] else "broadcast"
        return "shm"

    def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        version: int,
        reset_prefix_cache: bool = True,
        transport: str | None = None,
        probe: bool = False,
    ) -> dict[str, Any]:
        """Streams HF-named tensors into the engine through the configured transport, in buckets of
        `refit.bucket_mb`, from whichever process calls it (controller, a policy rank, a test).
        `probe` (benchmarks): move and copy the bytes without loading them into the model. An engine
        group sends one export to all of its engines with fanout.send_to_engines."""
        return fanout.send_to_engines([self], weights, version, reset_prefix_cache, transport, probe)

    def with_refit(self, **changes: Any) -> EngineClient:
        """This engine's handle with other refit settings (a shallow copy; the engine is the same)."""
        refit = dataclasses.replace(self.refit, **changes)
        if refit == self.refit:
            return self
        other = copy.copy(self)
        other.refit = refit
        return other

    def update_weights_from_path(self, path: str, version: int) -> dict[str, Any]:
        """The naive refit: the engine re-reads a checkpoint directory from disk."""
        return self._wait([self._submit("update_weights_from_path", path, version)], "reload from disk")[0]

    def refit_from(
        self, policy: Any, version: int, bucket_mb: int | None = None, transport: str | None = None
    ) -> dict[str, Any]:
        """Refits from a Megatron policy group. Unless the transport is "files", a policy offering
        `push_hf_weights(engine, version)` streams its export through `update_weights` on rank 0; with
        "files" its ranks write safetensors buckets to shared memory first and the engine loads them."""
        start = time.perf_counter()
        transport = transport or self.refit.transport
        if transport != "files" and hasattr(policy, "push_hf_weights"):
            engine = self.with_refit(transport=transport, bucket_mb=bucket_mb or self.refit.bucket_mb)
            stats = policy.push_hf_weights(engine, version)
            return check_complete({**stats, "refit_s": time.perf_counter() - start})
        with refit_workdir() as workdir:
            files, nbytes = policy.write_hf_buckets(workdir, bucket_mb or max(1, round(self.refit.bucket_mb)))
            exported = time.perf_counter()
            stats = self.load_bucket_files(files, version)
        total = time.perf_counter() - start
        return check_complete(
            {
                **stats,
                "transport": "files",
                "refit_s": total,
                "export_s": exported - start,
                "bytes": float(nbytes),
                "gb_per_s": nbytes / total / 1e9,
            }
        )

    def load_bucket_files(self, files: list[str], version: int) -> dict[str, Any]:
        """Loads safetensors bucket files a policy wrote (the `files` refit), as weight version `version`."""
        self._wait([self._submit("begin_refit", version)], "refit start")
        try:
            refs = [self._submit("load_bucket", "file", {"path": f}) for f in files]
            self._wait(refs, "refit bucket load")
        except BaseException:
            self._abort_refit()
            raise
        return self._wait([self._submit("end_refit", version, True)], "refit end")[0]

    def version(self) -> int:
        return self._wait([self._submit("ping")], "ping", 60)[0]

    def sleep(self, level: int) -> dict[str, float]:
        """vLLM sleep (VLLMEngine.sleep): the engine releases its weights and KV cache."""
        return self._wait([self._submit("sleep", level)], f"sleep (level {level})")[0]

    def wake_up(self, tags: list[str] | None = None) -> dict[str, float]:
        """Brings back the memory of `tags` ("weights", "kv_cache"; None: both)."""
        return self._wait([self._submit("wake_up", tags)], f"wake-up ({', '.join(tags or ['all'])})")[0]

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The engine's weights as it computes with them (vLLM names, fused layouts), on this side."""
        return self._wait([self._submit("read_weights")], "reading the engine's weights")[0]

    def shutdown(self) -> None:
        import ray

        transports.close_senders(self.actor_id)
        try:
            self._wait([self._submit("shutdown")], "shutdown", 30)
        except Exception:  # noqa: BLE001 - a dead engine is already shut down
            pass
        ray.kill(self.actor)
        if self.resources is not None:
            self.resources.release()


@contextmanager
def refit_workdir() -> Iterator[str]:
    """Scratch folder of the `files` refit's bucket files: shared memory where the node has it."""
    root = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
    workdir = tempfile.mkdtemp(prefix="megatron_rl_refit_", dir=root)
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_complete(stats: dict[str, Any]) -> dict[str, Any]:
    """A refit that left engine parameters at their old values would train against a stale sampler with no
    other symptom than a slowly growing token_mult_prob_error: fail it instead."""
    missing = stats.get("missing") or []
    if missing:
        raise RuntimeError(
            f"Refit left {len(missing)} engine parameter(s) with their old values (no exported tensor maps to "
            f"them): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The policy's export and "
            "the engine's model disagree on the architecture's tensor names."
        )
    return stats


def stream_from_policy_rank(
    engine: GenerationEngine | list[EngineClient],
    weights: Iterable[tuple[str, torch.Tensor]],
    rank: int,
    version: int,
) -> dict[str, Any] | None:
    """Runs on every rank of a Megatron policy during a refit. All ranks drain `weights` (an exporter whose
    TP/EP/PP gathers need every rank); rank 0 streams what it receives into the engine, bucket by bucket,
    so the full model is never held twice. `engine`: one engine, an engine group, or a list of
    EngineClients (one export fanned out to all of them). Returns rank 0's figures, None elsewhere."""
    if rank == 0:
        try:
            if isinstance(engine, list):
                return fanout.send_to_engines(engine, weights, version)
            return engine.update_weights(weights, version)
        except BaseException:
            # The other ranks are in the exporter's collectives: rank 0 finishes them before it raises,
            # else they wait forever and so does the controller, which waits for every rank.
            for _ in weights:
                pass
            raise
    for _ in weights:
        pass
    return None
