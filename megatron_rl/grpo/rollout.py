"""Rollout collection: prompts -> engine samples -> rewards -> group advantages (+ dynamic sampling)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.generation.base import SamplingSettings
from megatron_rl.grpo.batch import CUT, Rollouts


def sampling_settings(gen: Any, n: int, seed: int, greedy: bool = False) -> SamplingSettings:
    return SamplingSettings(
        temperature=0.0 if greedy else gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        stop=list(gen.stop),
        n=n,
        seed=seed,
    )


def generate(engine: Any, items: list[dict[str, Any]], sampling: SamplingSettings) -> Rollouts:
    results = engine.generate([it["prompt_ids"] for it in items], sampling)
    out = Rollouts([], [], [], [], [], sampling.n)
    for item, samples in zip(items, results):
        meta = {"answer": item["answer"], "prompt": item["prompt"]}
        for s in samples:
            out.prompt_ids.append(item["prompt_ids"])
            out.response_ids.append(s.token_ids)
            out.engine_logprobs.append(s.logprobs)
            out.finish_reasons.append(s.finish_reason)
            out.metadata.append(meta)
            out.responses.append(s.text)
            out.weight_version = s.weight_version
            out.routed_experts.append(s.routed_experts)
    if not any(r is not None for r in out.routed_experts):
        out.routed_experts = []  # a dense model, or router replay off
    return out


def informative_groups(rewards: torch.Tensor, groups: int | torch.Tensor) -> list[int]:
    """Groups whose rewards differ: the only ones with a nonzero group-relative advantage. `groups`: the
    group size (contiguous groups) or each sample's group id; the ids come back in first-seen order."""
    if not torch.is_tensor(groups):
        grouped = rewards.view(-1, groups)
        return [i for i in range(grouped.shape[0]) if grouped[i].max() > grouped[i].min()]
    seen: dict[int, list[float]] = {}
    for g, r in zip(groups.tolist(), rewards.tolist()):
        seen.setdefault(g, []).append(r)
    return [g for g, rs in seen.items() if max(rs) > min(rs)]


def collect(
    engine: Any, data: Any, env: Any, advantage_fn: Any, cfg: Any, seed: int, episodes: Any = None
) -> tuple[Rollouts, dict]:
    """One step's rollouts: one response per sample, or with `episodes` (grpo.episodes.episode_setup, for
    env.max_turns > 1) one multi-turn episode per sample, grouped by prompt through group ids. With dynamic
    sampling, groups whose rewards are all equal (no learning signal) are dropped and more prompts are
    drawn, up to `max_refill_batches` extra draws."""
    from megatron_rl.grpo.episodes import episode_metrics, episode_setup, play

    if episodes is None:
        episodes = episode_setup(cfg, data.tokenizer)  # None for single-turn runs
    g = cfg.grpo
    kept: list[Rollouts] = []
    n_groups = drawn = 0
    rewards_all: list[torch.Tensor] = []
    played = []
    for attempt in range(1 + (g.max_refill_batches if g.dynamic_sampling else 0)):
        items = data.take(g.prompts_per_step)
        sampling = sampling_settings(cfg.generation, g.num_generations, seed + attempt)
        groups: int | torch.Tensor = g.num_generations
        if episodes is None:
            batch = generate(engine, items, sampling)
            batch.rewards = torch.tensor(env.score(batch.responses, batch.metadata), dtype=torch.float32)
        else:
            batch, episode_batch = play(engine, env, items, sampling, episodes)
            played.append(episode_batch)
            groups = batch.groups()
        rewards_all.append(batch.rewards)
        drawn += g.prompts_per_step
        batch.advantages = advantage_fn(batch.rewards, groups, normalize_std=g.normalize_std)
        if g.dynamic_sampling:
            informative = informative_groups(batch.rewards, groups)
            batch = batch.select_groups(informative[: g.prompts_per_step - n_groups])
        kept.append(batch)
        n_groups += len(batch) // g.num_generations if episodes is None else len(set(batch.groups().tolist()))
        if not g.dynamic_sampling or n_groups >= g.prompts_per_step:
            break
    rollouts = Rollouts.concat(kept)
    rewards = torch.cat(rewards_all)  # every scored sample, kept or not: the honest reward curve
    # the model's tokens (an episode's observations are not its response)
    lengths = torch.tensor([sum(rollouts.mask_of(i)) for i in range(len(rollouts))], dtype=torch.float32)
    stats = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "response_length/mean": lengths.mean().item() if len(lengths) else 0.0,
        "response_length/max": lengths.max().item() if len(lengths) else 0.0,
        "rollout/truncated_fraction": sum(f in CUT for f in rollouts.finish_reasons) / max(len(rollouts), 1),
        "rollout/groups_kept": float(n_groups),
        "rollout/prompts_drawn": float(drawn),
    }
    if played:
        stats.update(episode_metrics(played))
    return rollouts, stats


def evaluate(
    engine: Any, items: list[dict[str, Any]], env: Any, gen_cfg: Any, samples: int = 0, episodes: Any = None
) -> dict[str, float]:
    """Held-out accuracy: greedy (`eval/accuracy`) and, with `samples` > 0, the mean over that many samples
    per prompt at the training temperature (`eval/accuracy_sampled`, what the policy actually generates).
    With `episodes` (multi-turn), the mean episode reward."""

    def accuracy(n: int, greedy: bool) -> float:
        sampling = sampling_settings(gen_cfg, n, seed=0, greedy=greedy)
        if episodes is not None:
            from megatron_rl.grpo.episodes import play

            batch = play(engine, env, items, sampling, episodes)[0]
            return batch.rewards.mean().item()
        batch = generate(engine, items, sampling)
        scores = env.score(batch.responses, batch.metadata)
        return sum(scores) / max(len(scores), 1)

    out = {"eval/accuracy": accuracy(1, True)}
    if samples:
        out["eval/accuracy_sampled"] = accuracy(samples, False)
    return out
