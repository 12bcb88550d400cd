"""Environments score a batch of responses. Single-turn ones implement `score`; a multi-turn environment
would add `step(history, metadata) -> (observation, done)` and be driven by the rollout loop until done."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from megatron_rl.errors import UserError

_ENVS: dict[str, Callable[..., Environment]] = {}


class Environment(ABC):
    @abstractmethod
    def score(self, responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """One reward per response; metadata carries what the dataset knew (e.g. the reference answer)."""


def register_environment(name: str):
    def deco(cls):
        _ENVS[name] = cls
        return cls

    return deco


def make_environment(name: str, **kwargs: Any) -> Environment:
    from megatron_rl.environments import math_verifier  # noqa: F401  (registers "math")

    if name not in _ENVS:
        raise UserError(f"Unknown environment {name!r}; registered: {', '.join(sorted(_ENVS))}.")
    return _ENVS[name](**kwargs)
