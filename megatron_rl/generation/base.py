"""The generation-engine interface the controller talks to, its settings, and the mismatch metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None


@dataclass
class EngineSettings:
    tp: int = 1
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    dtype: str = "float32"
    cpu_kv_cache_gb: float = 1.0
    trust_remote_code: bool = False
    seed: int = 0


@dataclass
class Sample:
    """One generated response."""

    token_ids: list[int]
    logprobs: list[float]  # of each sampled token
    finish_reason: str  # "stop" | "length"
    text: str
    weight_version: int


class GenerationEngine(ABC):
    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        """Per prompt, `sampling.n` samples."""

    @abstractmethod
    def update_weights(self, weights: Any, version: int) -> dict[str, float]:
        """Loads HF-named weights; later samples record `version`. Returns timing figures."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Before generation (GPU colocation: wake up, re-allocate the KV cache)."""

    def finish(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """After generation (GPU colocation: release memory for training)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Releases the engine."""


def token_mult_prob_error(policy_lp: torch.Tensor, engine_lp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over generated tokens of exp(|logp_policy - logp_engine|); 1.0 means the two agree exactly."""
    mask = mask.float()
    err = torch.exp((policy_lp.float() - engine_lp.float()).abs()) * mask
    return float(err.sum() / mask.sum().clamp(min=1.0))
