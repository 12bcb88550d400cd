"""Built-in arithmetic problems (the embedded default dataset): seeded, endless, with difficulty settings.

The default (single-digit addition, "3+4=") is learnable by a tiny random model after a short SFT warm
start; wider ranges, more terms and `*` make it harder. Expressions follow the usual precedence
(`*` before `+`/`-`), and the prompt says how to give the answer so the math verifier can parse it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.errors import UserError

OPS = ("+", "-", "*")
# Held-out (validation, evaluation) problems come from far past any index training reaches.
HELD_OUT_START = 10**9
# How the prompt asks for the answer. "plain" is the bare expression ("3+4="): the answer is the
# continuation, which tiny models learn fastest; the others are for instruction-tuned models.
ANSWER_FORMATS = {
    "plain": "{expr}=",
    "number": "What is {expr}? Answer with the number only.",
    "boxed": "What is {expr}? Put the final answer in \\boxed{{}}.",
}


@dataclass
class ArithmeticConfig:
    min_value: int = 0
    max_value: int = 9
    ops: list[str] = field(default_factory=lambda: ["+"])
    num_terms: int = 2
    seed: int = 0
    answer_format: str = "plain"  # plain | number | boxed


def check_config(cfg: ArithmeticConfig) -> None:
    bad = [op for op in cfg.ops if op not in OPS]
    if bad or not cfg.ops:
        raise UserError(
            f"data.arithmetic.ops must be a non-empty subset of {list(OPS)}, got {list(cfg.ops)}."
        )
    if cfg.min_value > cfg.max_value:
        raise UserError(
            f"data.arithmetic.min_value ({cfg.min_value}) must not exceed max_value ({cfg.max_value})."
        )
    if cfg.num_terms < 1:
        raise UserError(f"data.arithmetic.num_terms must be >= 1, got {cfg.num_terms}.")
    if cfg.answer_format not in ANSWER_FORMATS:
        raise UserError(
            f"data.arithmetic.answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {cfg.answer_format!r}."
        )


def evaluate(terms: list[int], ops: list[str]) -> int:
    """Value with `*` binding tighter than `+`/`-`: a sum of signed products."""
    total, product, sign = 0, terms[0], 1
    for op, t in zip(ops, terms[1:]):
        if op == "*":
            product *= t
        else:
            total += sign * product
            product, sign = t, (1 if op == "+" else -1)
    return total + sign * product


def _fmt(t: int) -> str:
    return f"({t})" if t < 0 else str(t)


class ArithmeticProblems:
    """problem(i) is a pure function of (config, i): resuming at position i gives the same stream."""

    def __init__(self, cfg: ArithmeticConfig) -> None:
        check_config(cfg)
        self.cfg = cfg

    def problem(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.cfg.seed}:{index}")
        terms = [rng.randint(self.cfg.min_value, self.cfg.max_value) for _ in range(self.cfg.num_terms)]
        ops = [rng.choice(self.cfg.ops) for _ in range(self.cfg.num_terms - 1)]
        expr = _fmt(terms[0]) + "".join(f"{op}{_fmt(t)}" for op, t in zip(ops, terms[1:]))
        prompt = ANSWER_FORMATS[self.cfg.answer_format].format(expr=expr)
        return {"prompt": prompt, "answer": str(evaluate(terms, ops))}
