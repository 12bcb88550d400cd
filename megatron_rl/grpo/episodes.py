"""GRPO's multi-turn side (`env.max_turns` > 1): prompts -> episodes (environments/multi_turn.py) -> the
trajectory batch, grouped by prompt through explicit group ids, and the episodes' metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_rl.environments.multi_turn import EpisodeBatch, EpisodeLimits, run_episodes
from megatron_rl.environments.turns import TurnRenderer
from megatron_rl.errors import UserError
from megatron_rl.generation.base import SamplingSettings
from megatron_rl.grpo.batch import CUT, Rollouts


@dataclass
class EpisodeSetup:
    renderer: TurnRenderer
    limits: EpisodeLimits
    workers: int
    system_prompt: str | None


def episode_setup(cfg: Any, tokenizer: Any) -> EpisodeSetup | None:
    """None for single-turn runs (env.max_turns == 1)."""
    e = cfg.env
    if e.max_turns <= 1:
        return None
    if cfg.grpo.get("max_staleness", 0) and not cfg.generation.colocated:
        raise UserError(
            f"env.max_turns={e.max_turns}: multi-turn episodes run on the synchronous schedule only; set "
            "grpo.max_staleness=0 (asynchronous GRPO generates single responses)."
        )
    budget = e.max_episode_tokens or cfg.generation.max_model_len
    if budget > cfg.generation.max_model_len:
        raise UserError(
            f"env.max_episode_tokens={budget} exceeds generation.max_model_len="
            f"{cfg.generation.max_model_len}: the engine could not hold the episode."
        )
    limits = EpisodeLimits(e.max_turns, cfg.generation.max_new_tokens, budget)
    return EpisodeSetup(TurnRenderer(tokenizer), limits, e.step_workers, cfg.data.system_prompt)


def play(
    engine: Any, env: Any, items: list[dict[str, Any]], sampling: SamplingSettings, setup: EpisodeSetup
) -> tuple[Rollouts, EpisodeBatch]:
    """`sampling.n` episodes per prompt; prompt k's episodes form group k (fewer if some failed)."""
    starts = []
    for k, item in enumerate(items):
        messages = [{"role": "system", "content": setup.system_prompt}] if setup.system_prompt else []
        messages.append({"role": "user", "content": item["prompt"]})
        meta = {key: v for key, v in item.items() if key != "prompt_ids"}
        starts += [(messages, item["prompt_ids"], meta, k)] * sampling.n
    played = run_episodes(engine, env, starts, sampling, setup.renderer, setup.limits, setup.workers)
    return Rollouts.from_trajectories(played.trajectories, sampling.n), played


def episode_metrics(played: list[EpisodeBatch]) -> dict[str, float]:
    """Over every episode played this step (kept by dynamic sampling or not), per episode unless said."""
    records = [t for p in played for t in p.trajectories]
    n = max(len(records), 1)
    turns = [t.stats["turns"] for t in records]
    return {
        "rollout/turns_mean": sum(turns) / n,
        "rollout/turns_max": max(turns, default=0.0),
        "rollout/tool_calls_per_episode": sum(t.stats["tool_calls"] for t in records) / n,
        "rollout/tool_errors": sum(t.stats["tool_errors"] for t in records),  # all episodes of the step
        "rollout/truncated_episodes": float(sum(t.finish_reason in CUT for t in records)),
        "rollout/max_turns_episodes": float(sum(t.finish_reason == "max_turns" for t in records)),
        "rollout/failed_episodes": float(sum(len(p.failed) for p in played)),
        "rollout/env_s": sum(t.stats["env_s"] for t in records),  # summed over episodes (they overlap)
        "rollout/engine_calls": float(sum(p.engine_calls for p in played)),
        "rollout/episode_tokens_mean": sum(len(t.prompt_ids) + len(t.response_ids) for t in records) / n,
    }
