"""The trajectory record and a GRPO rollout batch of them: rewards, advantages and the training sequences.

One sample (a `Trajectory`) is the prompt's token ids and everything after it (the response: one model turn
for single-turn GRPO; model turns and environment observations for an episode) exactly as the engine saw
them, with per response token: whether the model sampled it (the loss mask), the engine's logprob of it,
and the weight version that sampled it; plus its group id, the model turns' spans, its finish reason and
reward. `Rollouts` holds a batch of them column-wise; the trainer's sequences are built from these ids, so
nothing downstream re-tokenizes text.

Finish reasons: "stop" (the model ended its turn, and the episode is done), "length" (a turn hit
`generation.max_new_tokens`), "truncated" (the episode used its token budget, `env.max_episode_tokens`),
"max_turns" (the environment had not finished after `env.max_turns` turns). The overlong filter drops the
loss of "length" and "truncated" samples: their last turn was cut, not finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

CUT = ("length", "truncated")  # finish reasons of samples whose last turn was cut off


@dataclass
class Trajectory:
    """One sample. Per-token lists run over `response_ids` (the tokens after the prompt)."""

    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]  # the sampling engine's logprob of each model token; 0.0 elsewhere
    loss_mask: list[int]  # 1: the model sampled this token; 0: the environment's (an observation)
    token_versions: list[int]  # the weight version that sampled each model token (-1 elsewhere)
    turn_spans: list[tuple[int, int]]  # [start, end) of each model turn in response_ids
    finish_reason: str
    group_id: int
    metadata: dict[str, Any]
    text: str = ""  # the model turns' text (what a single-turn environment scores)
    reward: float | None = None
    stats: dict[str, float] = field(default_factory=dict)  # per episode: tool calls, env seconds, ...
    # MoE, with policy.router_replay: the experts the engine routed each token of prompt + response to,
    # [prompt + response - 1, layers, top_k] (generation/routing.py); None: not returned
    routed_experts: torch.Tensor | None = None


@dataclass
class Rollouts:
    """Flat over samples. Without explicit `group_ids`, sample i belongs to group i // group_size (one group
    per prompt, contiguous); with them, groups may be of any size (an episode that failed is left out)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    engine_logprobs: list[list[float]]
    finish_reasons: list[str]
    metadata: list[dict[str, Any]]
    group_size: int
    weight_version: int = 0
    responses: list[str] = field(default_factory=list)
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    # Empty: every response token is the model's, sampled at `weight_version`, in one turn (single-turn).
    loss_mask: list[list[int]] = field(default_factory=list)
    token_versions: list[list[int]] = field(default_factory=list)
    turn_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)
    # Empty: no sample carries the engine's routing (Trajectory.routed_experts)
    routed_experts: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    # One record's view of the columns (defaults where a column is empty)

    def mask_of(self, i: int) -> list[int]:
        return self.loss_mask[i] if self.loss_mask else [1] * len(self.response_ids[i])

    def versions_of(self, i: int) -> list[int]:
        return self.token_versions[i] if self.token_versions else [self.weight_version] * len(self.response_ids[i])

    def spans_of(self, i: int) -> list[tuple[int, int]]:
        return self.turn_spans[i] if self.turn_spans else [(0, len(self.response_ids[i]))]

    def group_of(self, i: int) -> int:
        return self.group_ids[i] if self.group_ids else i // self.group_size

    def groups(self) -> torch.Tensor:
        """Each sample's group id [len(self)]: what the advantage estimators group by."""
        return torch.tensor([self.group_of(i) for i in range(len(self))], dtype=torch.long)

    def num_turns(self) -> list[int]:
        return [len(self.spans_of(i)) for i in range(len(self))]

    def trajectory(self, i: int) -> Trajectory:
        return Trajectory(
            prompt_ids=self.prompt_ids[i],
            response_ids=self.response_ids[i],
            engine_logprobs=self.engine_logprobs[i],
            loss_mask=self.mask_of(i),
            token_versions=self.versions_of(i),
            turn_spans=self.spans_of(i),
            finish_reason=self.finish_reasons[i],
            group_id=self.group_of(i),
            metadata=self.metadata[i],
            text=self.responses[i] if self.responses else "",
            reward=float(self.rewards[i]) if self.rewards is not None else None,
            stats=self.stats[i] if self.stats else {},
            routed_experts=self.routed_experts[i] if self.routed_experts else None,
        )

    @staticmethod
    def from_trajectories(items: list[Trajectory], group_size: int, weight_version: int = 0) -> Rollouts:
        """Explicit columns from records (episodes); `group_size` is the nominal one (samples per prompt)."""
        out = Rollouts([], [], [], [], [], group_size, weight_version)
        for t in items:
            out.prompt_ids.append(t.prompt_ids)
            out.response_ids.append(t.response_ids)
            out.engine_logprobs.append(t.engine_logprobs)
            out.finish_reasons.append(t.finish_reason)
            out.metadata.append(t.metadata)
            out.responses.append(t.text)
            out.loss_mask.append(t.loss_mask)
            out.token_versions.append(t.token_versions)
            out.turn_spans.append(t.turn_spans)
            out.group_ids.append(t.group_id)
            out.stats.append(t.stats)
        if any(t.routed_experts is not None for t in items):
            out.routed_experts = [t.routed_experts for t in items]
        if items and all(t.reward is not None for t in items):
            out.rewards = torch.tensor([t.reward for t in items], dtype=torch.float32)
        return out

    def _explicit(self) -> bool:
        return bool(self.loss_mask or self.token_versions or self.turn_spans or self.group_ids or self.stats)

    def select_groups(self, groups: list[int]) -> Rollouts:
        """The rollouts of the given groups (by group id), in that order (dynamic sampling keeps informative
        groups)."""
        members: dict[int, list[int]] = {}
        for i in range(len(self)):
            members.setdefault(self.group_of(i), []).append(i)
        idx = [i for g in groups for i in members.get(g, [])]
        if not self._explicit():
            return self._pick(idx)
        return self._pick_explicit(idx)

    def _pick(self, idx: list[int]) -> Rollouts:
        def pick(xs: list[Any]) -> list[Any]:
            return [xs[i] for i in idx]

        return Rollouts(
            prompt_ids=pick(self.prompt_ids),
            response_ids=pick(self.response_ids),
            engine_logprobs=pick(self.engine_logprobs),
            finish_reasons=pick(self.finish_reasons),
            metadata=pick(self.metadata),
            group_size=self.group_size,
            weight_version=self.weight_version,
            responses=pick(self.responses) if self.responses else [],
            rewards=self.rewards[idx] if self.rewards is not None else None,
            advantages=self.advantages[idx] if self.advantages is not None else None,
            routed_experts=pick(self.routed_experts) if self.routed_experts else [],
        )

    def _pick_explicit(self, idx: list[int]) -> Rollouts:
        out = Rollouts.from_trajectories([self.trajectory(i) for i in idx], self.group_size, self.weight_version)
        if self.advantages is not None:
            out.advantages = self.advantages[idx]
        return out

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        """One batch of several; explicit group ids of later parts are shifted past the earlier parts' so
        groups of different draws never merge."""
        first = parts[0]
        if any(p._explicit() for p in parts):
            records, advantages, offset = [], [], 0
            for p in parts:
                ids = p.groups()
                for i in range(len(p)):
                    t = p.trajectory(i)
                    t.group_id = int(ids[i]) + offset
                    records.append(t)
                offset += int(ids.max()) + 1 if len(p) else 0
                advantages.append(p.advantages)
            out = Rollouts.from_trajectories(records, first.group_size, first.weight_version)
            if all(p.rewards is not None for p in parts):
                out.rewards = torch.cat([p.rewards for p in parts])
            if all(a is not None for a in advantages):
                out.advantages = torch.cat(advantages)
            return out
        out = Rollouts([], [], [], [], [], first.group_size, first.weight_version, [])
        for p in parts:
            out.prompt_ids += p.prompt_ids
            out.response_ids += p.response_ids
            out.engine_logprobs += p.engine_logprobs
            out.finish_reasons += p.finish_reasons
            out.metadata += p.metadata
            out.responses += p.responses
        if any(p.routed_experts for p in parts):
            out.routed_experts = [r for p in parts for r in (p.routed_experts or [None] * len(p))]
        if all(p.rewards is not None for p in parts):
            out.rewards = torch.cat([p.rewards for p in parts])
        if all(p.advantages is not None for p in parts):
            out.advantages = torch.cat([p.advantages for p in parts])
        return out

    def sequences(self, mask_truncated: bool = False) -> list[dict[str, Any]]:
        """Training sequences: ids = prompt + response; per-token fields are aligned with the policy's
        logprobs (position t scores token t+1), so response token k of a prompt of length P sits at P-1+k.
        `mask` (the loss) and `resp` (the mismatch metric) cover model tokens only; with `mask_truncated`
        (the overlong filter) a cut sample keeps no loss."""
        if self.advantages is None:
            raise ValueError("advantages are computed before building training sequences")
        seqs = []
        for i, (prompt, response) in enumerate(zip(self.prompt_ids, self.response_ids)):
            ids = torch.tensor(prompt + response, dtype=torch.long)
            n = len(ids) - 1
            mask, engine, resp = torch.zeros(n), torch.zeros(n), torch.zeros(n)
            start = len(prompt) - 1
            keep = not (mask_truncated and self.finish_reasons[i] in CUT)
            model = torch.tensor(self.mask_of(i), dtype=torch.float32)
            mask[start : start + len(response)] = model if keep else 0.0
            resp[start : start + len(response)] = model
            engine[start : start + len(response)] = torch.tensor(self.engine_logprobs[i], dtype=torch.float32)
            seqs.append(
                {
                    "ids": ids,
                    "mask": mask,
                    "engine_lp": engine,
                    "resp": resp,
                    "adv": float(self.advantages[i]),
                }
            )
            if self.routed_experts and self.routed_experts[i] is not None:
                seqs[-1]["routing"] = self.routed_experts[i]  # [n, layers, top_k], aligned like the fields
        return seqs
