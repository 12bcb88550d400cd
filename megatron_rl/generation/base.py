"""The generation-engine interface the controller talks to, and its settings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_rl.generation.metrics import token_mult_prob_error

__all__ = [
    "EngineSettings",
    "GenerationEngine",
    "RefitSettings",
    "Sample",
    "SamplingSettings",
    "token_mult_prob_error",
]


@dataclass
class SamplingSettings:
    temperature: float = 1.0  # 0.0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    n: int = 1  # samples per prompt
    seed: int | None = None


@dataclass
class EngineSettings:
    tp: int = 1
    # Pipeline stages and expert parallel inside the engine (generation/engine_parallel.py)
    pp: int = 1
    expert_parallel: bool = False
    # vLLM's executor for an engine of several workers: None picks "mp" (the engine actor's child processes,
    # one node); "ray" (workers placed in the engine's bundles, several nodes) is chosen by EngineClient.
    executor: str | None = None
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    dtype: str = "float32"
    cpu_kv_cache_gb: float = 1.0
    trust_remote_code: bool = False
    seed: int = 0
    # MoE: every Sample carries the experts each token was routed to (policy.router_replay, routing.py)
    return_routing: bool = False
    # vLLM sleep level the engine is built for (generation.sleep_level): 0 never sleeps; 1 and 2 create it
    # with enable_sleep_mode (GPU only) so that sleep()/wake_up() can release its memory.
    sleep_level: int = 0

    @property
    def world(self) -> int:
        """The engine's workers (GPUs on GPU): tp * pp."""
        return self.tp * self.pp


@dataclass
class RefitSettings:
    """How weights travel from the trainer into the engine.

    transport: "shm" (same node, CPU: a shared-memory safetensors file per bucket), "cuda_ipc" (same GPU:
    CUDA IPC handles), "broadcast" (any placement: gloo on CPU, NCCL on GPU, trainer rank 0 -> engine),
    or "auto" (cuda_ipc on a colocated GPU, shm on the same node otherwise, broadcast across nodes).
    """

    transport: str = "auto"
    bucket_mb: float = 256  # MiB per bucket (a tensor larger than this travels alone)
    slots: int = 2  # buffers in flight: the trainer fills one while the engine loads another
    timeout_s: float = 600.0


@dataclass
class Sample:
    """One generated response."""

    token_ids: list[int]
    logprobs: list[float]  # of each sampled token
    finish_reason: str  # "stop" | "length"
    text: str
    weight_version: int  # the weights it was sampled with (the oldest, when a refit landed mid-response)
    engine: int = 0  # which engine of the run's engine group sampled it
    # Per token, the weight version that sampled it (in-flight refits, generation/inflight.py); empty: all
    # tokens are `weight_version`.
    token_versions: list[int] = field(default_factory=list)
    # With EngineSettings.return_routing: [prompt + response - 1, layers, top_k] expert ids (routing.py)
    routed_experts: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids)


class GenerationEngine(ABC):
    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        """Per prompt, `sampling.n` samples."""

    @abstractmethod
    def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int, reset_prefix_cache: bool = True
    ) -> dict[str, Any]:
        """Loads HF-named weights streamed as (name, tensor) pairs; later samples record `version`, which must
        be newer than the current one. The prefix cache is reset (skipping that exists only to show why it
        matters). Returns figures (seconds, bytes)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Releases the engine."""
