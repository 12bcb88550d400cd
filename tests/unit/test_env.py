"""Environments: the math verifier's answer extraction and rewards, the registry, multi-turn episodes."""

from __future__ import annotations

import pytest

from megatron_rl.environments.base import StepResult, make_environment
from megatron_rl.environments.math_verifier import MathVerifier, extract_answer, parse_number
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


def test_guessing_game_hints_rewards_and_problems():
    game = make_environment("guessing_game", low=0, high=7, turn_cost=0.25)
    history = [{"role": "user", "content": game.prompt()}]
    hints = []
    for guess in ("3", "x", "6", "5"):
        history.append({"role": "assistant", "content": guess})
        (res,) = game.step([history], [{"answer": "5"}])
        hints.append(res.observation["content"] if res.observation else res.reward)
        if res.observation:
            history.append(res.observation)
    assert hints == ["higher", "Reply with one number from 0 to 7.", "lower", 0.25]  # 4th turn: 1 - 3 * 0.25
    assert game.problem(3) == game.problem(3) and {game.problem(i)["answer"] for i in range(50)} == {
        str(v) for v in range(8)
    }
    for i in range(20):  # played games: each guess within what the hints so far allow, the last one right
        demo = game.demonstration(i)
        guesses = [int(m["content"]) for m in demo if m["role"] == "assistant"]
        hints = [m["content"] for m in demo[2::2]]
        secret, lo, hi = guesses[-1], 0, 7
        for guess, hint in zip(guesses, hints):
            assert lo <= guess <= hi and hint == ("higher" if guess < secret else "lower")
            lo, hi = (guess + 1, hi) if hint == "higher" else (lo, guess - 1)
        assert len(hints) == len(guesses) - 1
    # with the range shown, and a cost for guesses the hints already rule out
    game = make_environment("guessing_game", show_range=True, wasted_cost=0.5)
    history, rewards = [{"role": "user", "content": game.prompt()}], []
    for guess in ("3", "1", "6", "5"):
        history.append({"role": "assistant", "content": guess})
        (res,) = game.step([history], [{"answer": "5"}])
        rewards.append(res.reward)
        if res.observation:
            history.append(res.observation)
    assert [m["content"] for m in history[2::2]] == ["higher (4-7)", "higher (4-7)", "lower (4-5)"]
    assert rewards == [0.0, -0.5, 0.0, 1.0]  # 1 was ruled out by "higher" after 3
    with pytest.raises(UserError, match="low"):
        make_environment("guessing_game", low=5, high=1)


def test_single_turn_environment_step_scores_and_finishes():
    res = make_environment("math").step(
        [[{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]], [{"answer": "7"}]
    )
    assert res == [StepResult(None, 1.0, True, {"extracted": 7.0, "correct": True})]
