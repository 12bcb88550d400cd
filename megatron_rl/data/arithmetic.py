"""Built-in arithmetic problems (the embedded default dataset): seeded, endless, with difficulty settings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass
class ArithmeticConfig:
    min_value: int = 0
    max_value: int = 9
    ops: list[str] = field(default_factory=lambda: ["+"])
    num_terms: int = 2
    seed: int = 0


class ArithmeticProblems:
    """problem(i) is a pure function of (seed, i): resuming at position i gives the same stream."""

    def __init__(self, cfg: ArithmeticConfig, instruction: str = "") -> None:
        bad = [op for op in cfg.ops if op not in _OPS]
        if bad or not cfg.ops:
            from megatron_rl.errors import UserError

            raise UserError(
                f"data.arithmetic.ops must be a non-empty subset of {sorted(_OPS)}, got {cfg.ops}"
            )
        self.cfg, self.instruction = cfg, instruction

    def problem(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.cfg.seed}:{index}")
        terms = [rng.randint(self.cfg.min_value, self.cfg.max_value) for _ in range(self.cfg.num_terms)]
        ops = [rng.choice(self.cfg.ops) for _ in range(self.cfg.num_terms - 1)]
        text, value = str(terms[0]), terms[0]
        for op, t in zip(ops, terms[1:]):
            # Left to right, as written (no precedence): prompts only use one operator kind by default.
            text, value = f"{text}{op}{t}", _OPS[op](value, t)
        prompt = f"{text}=" if not self.instruction else f"{self.instruction} {text}="
        return {"prompt": prompt, "answer": str(value)}
