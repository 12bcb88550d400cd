"""The default environment: extract the final numeric answer and compare it numerically."""

from __future__ import annotations

import re
from typing import Any

from megatron_rl.environments.base import Environment, register_environment

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer is[:\s]*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def extract_answer(text: str) -> float | None:
    """\\boxed{...} first, then "answer is X", then the last number in the text."""
    for pattern in (_BOXED, _ANSWER_IS):
        m = pattern.findall(text)
        if m:
            return _to_float(m[-1])
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", "").strip())
    except ValueError:
        return None


@register_environment("math")
class MathVerifier(Environment):
    def __init__(self, tolerance: float = 1e-6, format_reward: float = 0.0) -> None:
        self.tolerance, self.format_reward = tolerance, format_reward

    def score(self, responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        rewards = []
        for text, meta in zip(responses, metadata):
            got, want = extract_answer(text), _to_float(str(meta["answer"]))
            if got is None or want is None:
                rewards.append(0.0)
            elif abs(got - want) <= self.tolerance * max(1.0, abs(want)):
                rewards.append(1.0)
            else:
                rewards.append(self.format_reward)
        return rewards
