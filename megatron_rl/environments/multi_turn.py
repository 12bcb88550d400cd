"""The loop that drives multi-turn episodes: generate a reply for every unfinished episode, let the
environment answer, repeat until each is done or has used `max_turns` replies.

`respond` is the generation side, batched: conversations in, one reply text per conversation out (with the
vLLM engine: render each conversation with the chat template, generate, decode). The episode reward is the
sum of its step rewards; an episode cut off at `max_turns` keeps what it earned and is marked truncated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.environments.base import Environment, Message


@dataclass
class Episode:
    messages: list[Message]
    metadata: dict[str, Any]
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    truncated: bool = False
    infos: list[dict[str, Any]] = field(default_factory=list)


def run_episodes(
    env: Environment,
    respond: Callable[[list[list[Message]]], list[str]],
    conversations: list[list[Message]],
    metadata: list[dict[str, Any]],
    max_turns: int = 1,
) -> list[Episode]:
    episodes = [Episode([dict(m) for m in conv], meta) for conv, meta in zip(conversations, metadata)]
    for _ in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        replies = respond([e.messages for e in active])
        if len(replies) != len(active):
            raise ValueError(f"respond returned {len(replies)} replies for {len(active)} conversations")
        for e, reply in zip(active, replies):
            e.messages.append({"role": "assistant", "content": reply})
            e.turns += 1
        results = env.step([e.messages for e in active], [e.metadata for e in active])
        for e, res in zip(active, results):
            e.reward += res.reward
            e.infos.append(res.info)
            e.done = res.done
            if not res.done and res.observation is not None:
                e.messages.append(res.observation)
    for e in episodes:
        e.truncated = not e.done
    return episodes
