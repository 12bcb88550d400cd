"""Environments: the math verifier's answer extraction and rewards, the registry, multi-turn episodes."""

from __future__ import annotations

import pytest

from megatron_rl.environments.base import Environment, StepResult, make_environment, register_environment
from megatron_rl.environments.math_verifier import MathVerifier, extract_answer, parse_number
from megatron_rl.environments.multi_turn import run_episodes
from megatron_rl.errors import UserError


@pytest.mark.parametrize(
    "text, value",
    [
        ("so the total is 42", 42.0),  # last number
        ("12+7=19", 19.0),
        ("5-3=2", 2.0),
        ("it is -4", -4.0),
        ("\\boxed{-3.5} and 7", -3.5),  # \boxed wins over later numbers
        ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", 0.75),  # the last box, nested braces
        ("x = \\boxed{\\dfrac{1}{2}}", 0.5),
        ("The answer is 1,234.", 1234.0),  # thousands separator, trailing period
        ("The answer is 5. Then 6 more steps", 5.0),  # "answer is" wins over the last number
        ("Final answer: $12.50", 12.5),
        ("reasoning...\n#### 72", 72.0),  # GSM8K style
        ("3/4 of it", 0.75),
        ("about 50%", 50.0),
        ("no digits here", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_parse_reference_answers():
    assert parse_number("7") == 7.0 and parse_number("-0.25") == -0.25
    assert parse_number("\\frac{1}{4}") == 0.25 and parse_number("1/0") is None
    assert parse_number("1,000,000") == 1e6 and parse_number("x") is None


def test_math_rewards_and_info():
    env = make_environment("math")
    rewards, infos = env.score_with_info(["19", "the answer is 18", "no idea"], [{"answer": "19"}] * 3)
    assert rewards == [1.0, 0.0, 0.0]
    assert infos == [
        {"extracted": 19.0, "correct": True},
        {"extracted": 18.0, "correct": False},
        {"extracted": None, "correct": False},
    ]
    # numeric comparison with tolerance: 0.5 == 1/2; 1e-6 relative to max(1, |want|)
    assert env.score(
        ["0.5", "1000.0005", "1000.01"], [{"answer": "1/2"}, {"answer": 1000}, {"answer": 1000}]
    ) == [
        1.0,
        1.0,
        0.0,
    ]


def test_format_reward_for_parseable_wrong_answers():
    env = MathVerifier(format_reward=0.1)
    assert env.score(["\\boxed{8}", "\\boxed{7}", "dunno"], [{"answer": "7"}] * 3) == [0.1, 1.0, 0.0]
    assert MathVerifier(answer_key="solution").score(["3"], [{"solution": 3}]) == [1.0]


def test_registry_lists_environments():
    with pytest.raises(UserError, match=r"env\.name.*registered: .*math"):
        make_environment("chess")


class GuessTheNumber(Environment):
    """A toy multi-turn environment: the model guesses, the environment says higher/lower."""

    def score(self, responses, metadata):
        return [float(r.strip() == str(m["secret"])) for r, m in zip(responses, metadata)]

    def step(self, histories, metadata):
        out = []
        for h, m in zip(histories, metadata):
            guess = int(h[-1]["content"])
            if guess == m["secret"]:
                out.append(StepResult(None, 1.0, True, {"guess": guess}))
            else:
                hint = "higher" if guess < m["secret"] else "lower"
                out.append(StepResult({"role": "user", "content": hint}, -0.1, False, {"guess": guess}))
        return out


def test_multi_turn_episodes_run_until_done():
    register_environment("test_only_guess")(GuessTheNumber)
    env = make_environment("test_only_guess")

    def respond(histories):  # a "policy" that bisects 0..10 from the hints
        replies = []
        for h in histories:
            lo, hi = 0, 10
            for i in range(2, len(h), 2):  # (assistant guess, user hint) pairs after the first user message
                g = int(h[i - 1]["content"]) if h[i - 1]["role"] == "assistant" else None
                if g is not None and h[i]["content"] == "higher":
                    lo = g + 1
                elif g is not None:
                    hi = g - 1
            replies.append(str((lo + hi) // 2))
        return replies

    start = [[{"role": "user", "content": "guess 0..10"}]] * 3
    episodes = run_episodes(env, respond, start, [{"secret": 5}, {"secret": 9}, {"secret": 0}], max_turns=3)
    # secret 5: guess 5, done at once. secret 9: 5 (higher), 8 (higher), 9 -> 3 turns, -0.1 -0.1 +1.
    # secret 0: 5 (lower), 2 (lower), 0 (correct) -> 3 turns (bisect of 0..4 is 2, then 0..1 is 0).
    assert [e.turns for e in episodes] == [1, 3, 3]
    assert [e.reward for e in episodes] == pytest.approx([1.0, 0.8, 0.8])
    assert all(e.done and not e.truncated for e in episodes)
    assert [m["content"] for m in episodes[1].messages] == ["guess 0..10", "5", "higher", "8", "higher", "9"]
    cut = run_episodes(env, respond, start[:1], [{"secret": 9}], max_turns=2)[0]
    assert cut.truncated and cut.turns == 2 and cut.reward == pytest.approx(-0.2)


def test_single_turn_environment_step_scores_and_finishes():
    res = make_environment("math").step(
        [[{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]], [{"answer": "7"}]
    )
    assert res == [StepResult(None, 1.0, True, {"extracted": 7.0, "correct": True})]
