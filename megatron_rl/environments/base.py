"""Environments turn model responses into rewards.

Single turn (GRPO's default): implement `score(responses, metadata) -> rewards`; `metadata[i]` is what the
dataset knew about sample i's prompt (e.g. {"answer": "7"}). Override `score_with_info` to also return a
per-sample info dict (what was extracted, why it failed) for logging.

Multi-turn (`env.max_turns` > 1): override `step(histories, metadata)`. A history is the conversation so far
as chat messages (the prompt's, then per turn the model's reply as decoded text and the observations); the
last one is the model's reply. `step` returns, per episode, a `StepResult`: the observation messages (a
"user" or "tool" turn, rendered once with the chat template and appended as tokens before the model's next
turn), a reward for this step, whether the episode is done, and what it did (`tool_calls`, `tool_errors`,
logged per episode). The rollout (environments.multi_turn) calls `step` with one episode at a time from a
pool of `env.step_workers` threads, so a slow step (a tool running code) holds only its own episode; an
environment that keeps state across calls must guard it. A step that raises fails its episode only: the
episode is dropped from its group (advantages are computed over group ids, so the group shrinks).
The default `step` is single-turn: score the last reply and finish.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.algorithms.registry import Registry

Message = dict[str, str]


@dataclass
class StepResult:
    # Appended to the conversation when not done: one message or several (e.g. one "tool" message per call).
    observation: Message | list[Message] | None
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    tool_calls: int = 0  # tool calls the model made in this turn (metrics: per episode)
    tool_errors: int = 0  # of them, the malformed or failed ones (answered with an error observation)


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
    "environment",
    "env.name",
    (
        "megatron_rl.environments.math_verifier",
        "megatron_rl.environments.guessing_game",
        "megatron_rl.environments.tool_arithmetic",
    ),
)


def register_environment(name: str):
    return ENVIRONMENTS.register(name)


def make_environment(name: str, **kwargs: Any) -> Environment:
    return ENVIRONMENTS.get(name)(**kwargs)
