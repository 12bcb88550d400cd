"""The controller's handle on a vLLM engine running in its own Ray actor, and the refit path into it."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_rl.generation.base import EngineSettings, Sample, SamplingSettings
from megatron_rl.generation.vllm_engine import VLLMEngine
from megatron_rl.grpo.ray_utils import gather, remote_class


def _shm_root() -> str:
    # /dev/shm is RAM-backed: writing and mmap-reading a bucket there costs a memory copy, not disk I/O.
    return "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()


class EngineClient:
    def __init__(
        self,
        model_dir: str,
        settings: EngineSettings,
        num_cpus: float = 1,
        num_gpus: float = 0,
        timeout_s: float = 600,
    ) -> None:
        self.timeout_s = timeout_s
        if not (Path(model_dir) / "config.json").is_file():
            # Checked here too: an actor that dies in its constructor reports only a generic death.
            from megatron_rl.errors import UserError

            raise UserError(f"Generation engine: no model at {model_dir} (config.json missing).")
        cls = remote_class(VLLMEngine)
        self.actor = cls.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(model_dir, settings)
        gather([self.actor.ping.remote()], "starting the generation engine", timeout_s)

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        return gather([self.actor.generate.remote(prompts, sampling)], "generation", self.timeout_s)[0]

    def update_weights(self, weights: Any, version: int, reset_prefix_cache: bool = True) -> dict[str, float]:
        ref = self.actor.update_weights.remote(weights, version, reset_prefix_cache)
        return gather([ref], "weight update", self.timeout_s)[0]

    def refit_from(self, policy: Any, version: int, bucket_mb: int = 512) -> dict[str, float]:
        """Policy ranks gather HF tensors; rank 0 writes them as shared-memory safetensors buckets that the
        engine memory-maps in one in-place reload. Returns seconds and bytes."""
        start = time.perf_counter()
        workdir = tempfile.mkdtemp(prefix="megatron_rl_refit_", dir=_shm_root())
        try:
            files, nbytes = policy.write_hf_buckets(workdir, bucket_mb)
            exported = time.perf_counter()
            timing = self.update_weights(files, version)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        total = time.perf_counter() - start
        return {
            "refit_s": total,
            "export_s": exported - start,
            "bytes": float(nbytes),
            "gb_per_s": nbytes / total / 1e9,
            **timing,
        }

    def shutdown(self) -> None:
        import ray

        ray.kill(self.actor)
