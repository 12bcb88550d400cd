"""A GRPO rollout batch: prompts x generations, their rewards and advantages, and the training sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Rollouts:
    """Flat over samples; sample i belongs to group i // group_size (one group per prompt)."""

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

    def __len__(self) -> int:
        return len(self.response_ids)

    def select_groups(self, groups: list[int]) -> Rollouts:
        """The rollouts of the given groups, in that order (dynamic sampling keeps informative groups)."""
        idx = [g * self.group_size + j for g in groups for j in range(self.group_size)]

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
        )

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        first = parts[0]
        out = Rollouts([], [], [], [], [], first.group_size, first.weight_version, [])
        for p in parts:
            out.prompt_ids += p.prompt_ids
            out.response_ids += p.response_ids
            out.engine_logprobs += p.engine_logprobs
            out.finish_reasons += p.finish_reasons
            out.metadata += p.metadata
            out.responses += p.responses
        if all(p.rewards is not None for p in parts):
            out.rewards = torch.cat([p.rewards for p in parts])
        if all(p.advantages is not None for p in parts):
            out.advantages = torch.cat([p.advantages for p in parts])
        return out

    def sequences(self, mask_truncated: bool = False) -> list[dict[str, Any]]:
        """Training sequences: ids = prompt + response; per-token fields are aligned with the policy's
        logprobs (position t scores token t+1), so response token k of a prompt of length P sits at P-1+k."""
        if self.advantages is None:
            raise ValueError("advantages are computed before building training sequences")
        seqs = []
        for i, (prompt, response) in enumerate(zip(self.prompt_ids, self.response_ids)):
            ids = torch.tensor(prompt + response, dtype=torch.long)
            n = len(ids) - 1
            mask, engine, resp = torch.zeros(n), torch.zeros(n), torch.zeros(n)
            start = len(prompt) - 1
            keep = not (mask_truncated and self.finish_reasons[i] == "length")
            mask[start : start + len(response)] = 1.0 if keep else 0.0
            resp[start : start + len(response)] = 1.0
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
        return seqs
