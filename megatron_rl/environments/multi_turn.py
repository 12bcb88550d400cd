"""Multi-turn episodes, token in and token out: the engine is given token ids and returns token ids with
their logprobs; an episode's ids only grow.

Each turn appends exactly the tokens the engine sampled (loss mask 1, their engine logprobs and weight
versions), then, unless the episode is over, the environment's observation tokens (loss mask 0), rendered
once by `TurnRenderer` and tokenized once. Nothing earlier is rendered or tokenized again, so the trainer
scores exactly the tokens the engine sampled, in the context it sampled them in.

Scheduling: every episode waiting for its next turn goes to the engine in one `generate` call; the
environment's steps run in a thread pool meanwhile, one episode each. After a call, the loop takes the
episodes whose steps have finished (waiting for the first, then for as long as more keep finishing within
`COALESCE_S`) and generates their next turns: a slow step (a tool running code) holds only its own
episode, which joins a later call. A step that raises fails its episode only (it is left out of the batch).

Limits: `max_turns` model turns; `max_new_tokens` per turn (a turn cut there ends the episode, finish
reason "length"); `max_tokens` for the whole episode (the last turn is cut at the budget, or an observation
that would cross it is not appended; finish reason "truncated"). A cut turn is still stepped, so the
environment's reward for it counts (a policy cannot escape a penalty by rambling), then the episode ends.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_rl.environments.base import Environment, Message, StepResult
from megatron_rl.environments.turns import TurnRenderer
from megatron_rl.generation.base import GenerationEngine, Sample, SamplingSettings
from megatron_rl.grpo.batch import Trajectory

# How long the loop keeps collecting finished environment steps before the next engine call: long enough
# for steps submitted together to land in one call, short next to a generation call.
COALESCE_S = 0.05


@dataclass
class EpisodeLimits:
    max_turns: int
    max_new_tokens: int  # per turn
    max_tokens: int  # whole episode: prompt, model turns and observations


@dataclass
class Episode:
    index: int  # position in the batch: seeds its turns
    group_id: int
    metadata: dict[str, Any]
    messages: list[Message]  # the conversation as text, for the environment
    prompt_ids: list[int]
    trajectory: Trajectory = field(init=False)
    reward: float = 0.0
    env_s: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0
    error: str | None = None
    cut: str | None = None  # "length" or "truncated": the last turn was cut off, the episode ends after it

    def __post_init__(self) -> None:
        self.trajectory = Trajectory(
            self.prompt_ids, [], [], [], [], [], "", self.group_id, self.metadata
        )

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.trajectory.response_ids

    @property
    def turns(self) -> int:
        return len(self.trajectory.turn_spans)

    def add_model_turn(self, sample: Sample) -> None:
        t = self.trajectory
        start = len(t.response_ids)
        n = len(sample.token_ids)
        t.response_ids += sample.token_ids
        t.engine_logprobs += sample.logprobs
        t.loss_mask += [1] * n
        versions = getattr(sample, "token_versions", None) or [sample.weight_version] * n
        t.token_versions += versions
        t.turn_spans.append((start, start + n))
        t.text = f"{t.text}\n{sample.text}" if t.text else sample.text
        self.messages.append({"role": "assistant", "content": sample.text})

    def add_observation(self, ids: list[int], messages: list[Message]) -> None:
        t = self.trajectory
        t.response_ids += ids
        t.engine_logprobs += [0.0] * len(ids)
        t.loss_mask += [0] * len(ids)
        t.token_versions += [-1] * len(ids)
        self.messages += messages

    def finish(self, reason: str) -> Trajectory:
        t = self.trajectory
        t.finish_reason, t.reward = reason, self.reward
        t.stats = {
            "turns": float(self.turns),
            "tool_calls": float(self.tool_calls),
            "tool_errors": float(self.tool_errors),
            "env_s": self.env_s,
        }
        return t


def _step(env: Environment, episode: Episode) -> tuple[StepResult, float]:
    start = time.perf_counter()
    result = env.step([episode.messages], [episode.metadata])[0]
    return result, time.perf_counter() - start


def _observation_messages(result: StepResult) -> list[Message]:
    obs = result.observation
    if obs is None:
        return []
    return list(obs) if isinstance(obs, list) else [obs]


@dataclass
class EpisodeBatch:
    """What `run_episodes` returns: finished trajectories (failed episodes left out) and run figures."""

    trajectories: list[Trajectory]
    failed: list[tuple[int, str]]  # (episode index, error)
    engine_calls: int
    seconds: float


def run_episodes(
    engine: GenerationEngine,
    env: Environment,
    starts: list[tuple[list[Message], list[int], dict[str, Any], int]],
    sampling: SamplingSettings,
    renderer: TurnRenderer,
    limits: EpisodeLimits,
    workers: int = 8,
) -> EpisodeBatch:
    """Runs one episode per start (messages, prompt ids, metadata, group id) to its end. `sampling` gives
    the temperature etc. and the base seed (each call's seed is derived from it); its n is ignored (one
    sample per episode and turn)."""
    t0 = time.perf_counter()
    episodes = [Episode(i, g, meta, list(msgs), list(ids)) for i, (msgs, ids, meta, g) in enumerate(starts)]
    done: dict[int, Trajectory] = {}
    failed: list[tuple[int, str]] = []
    waiting = list(episodes)  # for the engine
    running: dict[Future, Episode] = {}  # environment steps in flight
    calls = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="env-step") as pool:
        while waiting or running:
            for allowed, batch in _by_allowance(waiting, limits).items():
                if allowed <= 0:
                    for e in batch:
                        done[e.index] = e.finish("truncated")
                    continue
                # the engine seeds prompt i of a call with seed + i: calls of one step and of the next
                # steps must not share seeds (episodes of the same prompt would repeat their samples)
                seed = None if sampling.seed is None else sampling.seed * 1_000_003 + 7919 * calls
                settings = replace(sampling, n=1, max_new_tokens=allowed, seed=seed)
                results = engine.generate([e.ids for e in batch], settings)
                calls += 1
                for e, samples in zip(batch, results):
                    sample = samples[0]
                    e.add_model_turn(sample)
                    if sample.finish_reason == "length":
                        e.cut = "truncated" if allowed < limits.max_new_tokens else "length"
                    # a cut turn is stepped too: the environment scores every turn (a cut one cannot
                    # escape what a finished bad one would cost), but the episode ends after it
                    running[pool.submit(_step, env, e)] = e
            waiting = []
            for future in _finished(running):
                e = running.pop(future)
                try:
                    result, seconds = future.result()
                except Exception as exc:  # the environment's failure ends this episode only
                    failed.append((e.index, f"{type(exc).__name__}: {exc}"))
                    continue
                _apply(e, result, seconds, renderer, limits, done, waiting)
    if failed and not done:
        raise RuntimeError(f"every episode's environment step failed; the first: {failed[0][1]}")
    return EpisodeBatch(
        [done[i] for i in sorted(done)], failed, calls, time.perf_counter() - t0
    )


def _apply(
    e: Episode,
    result: StepResult,
    seconds: float,
    renderer: TurnRenderer,
    limits: EpisodeLimits,
    done: dict[int, Trajectory],
    waiting: list[Episode],
) -> None:
    e.reward += float(result.reward)
    e.env_s += seconds
    e.tool_calls += result.tool_calls
    e.tool_errors += result.tool_errors
    if e.cut:
        done[e.index] = e.finish(e.cut)
        return
    if result.done:
        done[e.index] = e.finish("stop")
        return
    if e.turns >= limits.max_turns:
        done[e.index] = e.finish("max_turns")
        return
    messages = _observation_messages(result)
    last = e.trajectory.response_ids[-1] if e.trajectory.response_ids else None
    ids = renderer.observation_ids(messages, last)
    if len(e.ids) + len(ids) >= limits.max_tokens:  # no room for the observation and a reply
        done[e.index] = e.finish("truncated")
        return
    e.add_observation(ids, messages)
    waiting.append(e)


def _by_allowance(waiting: list[Episode], limits: EpisodeLimits) -> dict[int, list[Episode]]:
    """Episodes grouped by how many tokens their next turn may sample (the per-turn limit, or less near the
    episode budget), in batch order."""
    out: dict[int, list[Episode]] = {}
    for e in sorted(waiting, key=lambda e: e.index):
        allowed = min(limits.max_new_tokens, limits.max_tokens - len(e.ids))
        out.setdefault(allowed, []).append(e)
    return out


def _finished(running: dict[Future, Episode]) -> list[Future]:
    """The steps finished now: waits for the first, then collects more while they keep finishing."""
    if not running:
        return []
    finished, pending = wait(list(running), return_when=FIRST_COMPLETED)
    while pending:
        more, pending = wait(pending, timeout=COALESCE_S, return_when=FIRST_COMPLETED)
        if not more:
            break
        finished |= more
    return sorted(finished, key=lambda f: running[f].index)
