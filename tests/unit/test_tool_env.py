"""The tool-using arithmetic environment: tool turns, final answers, its problems and demonstrations, the
smollm2_135m_tool recipe, and tool results rendered as the next turn's tokens."""

from __future__ import annotations

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.data.chat import tokenize_conversation
from megatron_rl.environments.base import make_environment
from megatron_rl.environments.tool_calls import has_tool_role
from megatron_rl.environments.turns import TurnRenderer
from megatron_rl.errors import UserError
from megatron_rl.models.tiny import CHAT_TEMPLATE, build_tokenizer
from tests.unit.test_tools import HERMES_TEMPLATE

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "47+38"}}\n</tool_call>'


def _step(env, reply: str, answer: str = "85"):
    (result,) = env.step([[{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]],
                         [{"answer": answer}])
    return result


def test_a_tool_call_gets_its_result_and_no_reward_yet():
    env = make_environment("tool_arithmetic")
    r = _step(env, "Let me use the calculator.\n" + CALL)
    assert (r.done, r.reward, r.tool_calls, r.tool_errors) == (False, 0.0, 1, 0)
    assert r.observation == [{"role": "user", "content": "<tool_response>\n85\n</tool_response>"}]


@pytest.mark.parametrize(
    "reply, error",
    [
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "47+"}}</tool_call>', "not a valid expression"),
        ('<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>', "unknown tool 'python'"),
        ("<tool_call>{calculator: 47+38}</tool_call>", "not valid JSON"),
    ],
)
def test_malformed_calls_are_answered_with_an_error(reply, error):
    r = _step(make_environment("tool_arithmetic"), reply)
    assert (r.done, r.tool_calls, r.tool_errors) == (False, 1, 1)
    assert error in r.observation[0]["content"]


def test_the_first_reply_without_a_call_is_the_final_answer():
    env = make_environment("tool_arithmetic")
    assert (_step(env, "The answer is 85.").reward, _step(env, "The answer is 85.").done) == (1.0, True)
    assert _step(env, "The answer is 84.").reward == 0.0
    assert _step(env, "I do not know").reward == 0.0


def test_the_python_tool_and_tool_turns():
    env = make_environment("tool_arithmetic", tools=["python"], tool_role=True, python_limits={"timeout_s": 2})
    r = _step(env, '<tool_call>{"name": "python", "arguments": {"code": "print(47 + 38)"}}</tool_call>')
    assert r.observation == [{"role": "tool", "content": "85\n"}] and r.tool_errors == 0
    with pytest.raises(UserError, match="Unknown tool 'shell'"):
        make_environment("tool_arithmetic", tools=["shell"])


def test_problems_and_demonstrations():
    env = make_environment("tool_arithmetic", min_value=10, max_value=99, seed=3)
    p = env.problem(5)
    assert p == env.problem(5) and p["prompt"].startswith("What is ") and p["prompt"].endswith("?")
    a, b = p["prompt"][len("What is "):-1].split("+")
    assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and int(p["answer"]) == int(a) + int(b)
    demo = env.demonstration(5)
    assert [m["role"] for m in demo] == ["system", "user", "assistant", "user", "assistant"]
    assert demo[0]["content"] == env.system_prompt and demo[1]["content"] == p["prompt"]
    # Played back through the environment, the demonstration's call gets exactly its observation, and its
    # answer is right.
    r = _step(env, demo[2]["content"], p["answer"])
    assert r.observation == [demo[3]] and r.tool_errors == 0
    assert _step(env, demo[4]["content"], p["answer"]).reward == 1.0
    # It trains on the model's two turns only.
    tokenizer = build_tokenizer()
    ids, mask = tokenize_conversation(tokenizer, demo)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "calculator" in trained and f"The answer is {p['answer']}" in trained
    assert "<tool_response>" not in trained and "You can use tools" not in trained


def test_the_recipe_states_the_environments_tool_format():
    cfg = compose("smollm2_135m_tool")
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    assert cfg.data.system_prompt == env.system_prompt  # the prompt the demonstrations were trained with
    assert cfg.data.kind == "environment" and cfg.env.max_turns >= 2 and cfg.model.hf_path == "smollm2"
    assert cfg.model.warmup_sft_steps > 0 and cfg.model.warmup_sft_lr < 1e-3


def test_tool_results_render_as_the_templates_next_turn():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # no tool turn: the results come back as a user turn
    assert not has_tool_role(tokenizer)
    user_env = make_environment("tool_arithmetic", tool_role=False)
    obs = _step(user_env, CALL).observation
    renderer = TurnRenderer(tokenizer)
    expected = "<|im_start|>user\n<tool_response>\n85\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert renderer.turn_text(obs) == expected
    ids = renderer.observation_ids(obs, None)  # after a turn the model did not close itself
    assert tokenizer.decode(ids) == renderer.turn_end + expected
    tokenizer.chat_template = HERMES_TEMPLATE  # a tool turn: "tool" messages, which it wraps itself
    assert has_tool_role(tokenizer)
    tool_env = make_environment("tool_arithmetic", tool_role=True)
    obs = _step(tool_env, CALL).observation
    assert obs == [{"role": "tool", "content": "85"}]
    rendered = TurnRenderer(tokenizer).turn_text(obs)
    assert rendered == "<|im_start|>user\n<tool_response>\n85\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
