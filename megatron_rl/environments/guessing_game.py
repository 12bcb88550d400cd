"""A multi-turn guessing game: the model guesses a hidden number, the environment answers "higher" or
"lower", until the model finds it or runs out of turns (`env.max_turns`).

Reward: 1 for finding the number, less `turn_cost` for every turn before the one that found it; 0 when it
was not found. A reply that is not a number in range counts as a wrong guess and gets a reminder instead of
a hint. The game also supplies its own prompts (`data.kind=environment`: `problem(index)`, seeded, endless)
and demonstrations for the tiny model's SFT warm start (`demonstration(index)`: a player that guesses
uniformly among the numbers the hints so far allow), which teach the format and some use of the hints;
GRPO then learns to use them better (bisecting finds it in fewer turns).
"""

from __future__ import annotations

import random
import re
from typing import Any

from megatron_rl.environments.base import Environment, Message, StepResult, register_environment
from megatron_rl.errors import UserError

_INT = re.compile(r"^\s*(-?\d+)\s*\.?\s*$")


@register_environment("guessing_game")
class GuessingGame(Environment):
    def __init__(
        self,
        low: int = 0,
        high: int = 7,
        turn_cost: float = 0.0,
        seed: int = 0,
        show_range: bool = False,
        wasted_cost: float = 0.0,
    ) -> None:
        if low > high:
            raise UserError(f"env.kwargs: the guessing game's low ({low}) must not exceed high ({high}).")
        self.low, self.high, self.turn_cost, self.seed = low, high, turn_cost, seed
        self.show_range = show_range  # hints also say where the number still is: "higher (4-7)"
        # charged for a guess the hints so far already rule out (or no number): a wasted turn
        self.wasted_cost = wasted_cost

    # Tasks and demonstrations

    def prompt(self) -> str:
        return f"Guess my number ({self.low}-{self.high})."

    def problem(self, index: int) -> dict[str, Any]:
        secret = random.Random(f"{self.seed}/{index}").randint(self.low, self.high)
        return {"prompt": self.prompt(), "answer": str(secret)}

    def hint(self, guess: int | None, secret: int, guesses: list[int | None] = ()) -> str:
        """The answer to `guess`; `guesses`: all of the episode's guesses so far (for the range)."""
        if guess is None or not self.low <= guess <= self.high:
            return f"Reply with one number from {self.low} to {self.high}."
        word = "higher" if guess < secret else "lower"
        if not self.show_range:
            return word
        lo, hi = self.possible(guesses, secret)
        return f"{word} ({lo}-{hi})"

    def possible(self, guesses: list[int | None], secret: int) -> tuple[int, int]:
        """The range the hints to `guesses` leave."""
        lo = max([g + 1 for g in guesses if g is not None and g < secret], default=self.low)
        hi = min([g - 1 for g in guesses if g is not None and g > secret], default=self.high)
        return lo, hi

    def demonstration(self, index: int, max_turns: int = 8) -> list[Message]:
        """A played game (prompt, guesses, hints) for SFT: guesses uniform among the numbers still
        possible."""
        rng = random.Random(f"demo/{self.seed}/{index}")
        secret = rng.randint(self.low, self.high)
        lo, hi = self.low, self.high
        messages: list[Message] = [{"role": "user", "content": self.prompt()}]
        guesses: list[int | None] = []
        for _ in range(max_turns):
            guess = rng.randint(lo, hi)
            guesses.append(guess)
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == secret:
                break
            messages.append({"role": "user", "content": self.hint(guess, secret, guesses)})
            lo, hi = (guess + 1, hi) if guess < secret else (lo, guess - 1)
        return messages

    # Playing

    @staticmethod
    def parse(reply: str) -> int | None:
        m = _INT.match(reply)
        return int(m.group(1)) if m else None

    def step(self, histories: list[list[Message]], metadata: list[dict[str, Any]]) -> list[StepResult]:
        out = []
        for history, meta in zip(histories, metadata):
            secret = int(meta["answer"])
            guesses = [self.parse(m["content"]) for m in history if m["role"] == "assistant"]
            guess, turns = guesses[-1], len(guesses)
            lo, hi = self.possible(guesses[:-1], secret)
            penalty = self.wasted_cost if guess is None or not lo <= guess <= hi else 0.0
            if guess == secret:
                reward = max(0.0, 1.0 - self.turn_cost * (turns - 1))
                out.append(StepResult(None, reward - penalty, True, {"guess": guess, "turns": turns}))
            else:
                hint = {"role": "user", "content": self.hint(guess, secret, guesses)}
                out.append(StepResult(hint, -penalty, False, {"guess": guess, "turns": turns}))
        return out

    def score(self, responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """Single-turn use (env.max_turns=1): found at the first guess."""
        return [float(self.parse(r) == int(m["answer"])) for r, m in zip(responses, metadata)]
