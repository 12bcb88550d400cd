"""The default environment: extract the final numeric answer and compare it numerically.

Where the answer is looked for, in order: the last \\boxed{...} (nested braces allowed), the last
"answer is X" / "answer: X", the last GSM8K-style "#### X", and finally the last number in the text.
Numbers may be negative, decimal, use thousands separators (1,234), be fractions (3/4, \\frac{3}{4}) or
percentages (the % is dropped). Correct means |got - want| <= tolerance * max(1, |want|).
"""

from __future__ import annotations

import re
from typing import Any

from megatron_rl.environments.base import Environment, register_environment

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_FRACTION = re.compile(rf"^\s*({_NUM})\s*/\s*({_NUM})\s*$")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_NUMBER = re.compile(rf"(?:{_NUM})(?:\s*/\s*\d+(?!\.\d))?")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\$?\s*(" + _NUM + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...}, with balanced nested braces."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def parse_number(s: str) -> float | None:
    """A number, fraction, \\frac or percentage written alone (surrounding $, spaces and text units ok)."""
    s = _LATEX_FRAC.sub(r"\1/\2", s).replace("$", "").replace("\\%", "").replace("%", "").strip()
    m = _FRACTION.match(s)
    if m:
        den = float(m.group(2).replace(",", ""))
        return float(m.group(1).replace(",", "")) / den if den else None
    numbers = _NUMBER.findall(s)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(token: str) -> float | None:
    if "/" in token:
        return parse_number(token)
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The response's final answer as a number, or None when it gives none."""
    boxed = _boxed_contents(text)
    if boxed:
        return parse_number(boxed[-1])
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return _to_float(found[-1])
    numbers = _NUMBER.findall(_LATEX_FRAC.sub(r"\1/\2", text))
    return _to_float(numbers[-1]) if numbers else None


@register_environment("math")
class MathVerifier(Environment):
    """Reward 1.0 for a correct answer; `format_reward` (default 0) for a wrong but parseable one; 0.0 for
    no answer. `answer_key` names the metadata field holding the reference answer."""

    def __init__(
        self, tolerance: float = 1e-6, format_reward: float = 0.0, answer_key: str = "answer"
    ) -> None:
        self.tolerance, self.format_reward, self.answer_key = tolerance, format_reward, answer_key

    def score(self, responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        return self.score_with_info(responses, metadata)[0]

    def score_with_info(
        self, responses: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[list[float], list[dict[str, Any]]]:
        if len(responses) != len(metadata):
            raise ValueError(f"{len(responses)} responses but {len(metadata)} metadata entries")
        rewards, infos = [], []
        for text, meta in zip(responses, metadata):
            got, want = extract_answer(text), parse_number(str(meta[self.answer_key]))
            correct = (
                got is not None
                and want is not None
                and abs(got - want) <= self.tolerance * max(1.0, abs(want))
            )
            if correct:
                rewards.append(1.0)
            else:
                rewards.append(self.format_reward if got is not None else 0.0)
            infos.append({"extracted": got, "correct": correct})
        return rewards, infos
