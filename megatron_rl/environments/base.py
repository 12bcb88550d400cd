"""Environments turn model responses into rewards.

Single turn (GRPO's default): implement `score(responses, metadata) -> rewards`; `metadata[i]` is what the
dataset knew about sample i's prompt (e.g. {"answer": "7"}). Override `score_with_info` to also return a
per-sample info dict (what was extracted, why it failed) for logging.

Multi-turn: override `step(histories, metadata)`. A history is the conversation so far (chat messages,
the last one the model's reply); `step` returns, per episode, the next observation (a user/tool message
the rollout loop appends before generating again), a reward for this step, and whether the episode is
done. The default `step` is single-turn: score the last reply and finish. `environments.multi_turn
.run_episodes` is the loop that drives a batch of episodes until every one is done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.algorithms.registry import Registry

Message = dict[str, str]


@dataclass
class StepResult:
    observation: Message | None  # appended to the conversation when not done (role "user" or "tool")
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    @abstractmethod
    def score(self, responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """One reward per response."""

    def score_with_info(
        self, responses: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[list[float], list[dict[str, Any]]]:
        return self.score(responses, metadata), [{} for _ in responses]

    def step(self, histories: list[list[Message]], metadata: list[dict[str, Any]]) -> list[StepResult]:
        replies = [h[-1]["content"] for h in histories]
        rewards, infos = self.score_with_info(replies, metadata)
        return [StepResult(None, r, True, info) for r, info in zip(rewards, infos)]


ENVIRONMENTS: Registry[type[Environment]] = Registry(
    "environment", "env.name", ("megatron_rl.environments.math_verifier",)
)


def register_environment(name: str):
    return ENVIRONMENTS.register(name)


def make_environment(name: str, **kwargs: Any) -> Environment:
    return ENVIRONMENTS.get(name)(**kwargs)
