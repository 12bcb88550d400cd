"""Agent tools: the calculator's safe evaluation, tool calls in the model's format (malformed ones become
error observations), the registry, and tool results as conversation turns."""

from __future__ import annotations

import asyncio
import time

import pytest

from megatron_rl.environments.calculator import CalculatorError, evaluate, format_number
from megatron_rl.environments.tool_calls import (
    ToolCall,
    ToolResult,
    answer_tool_calls,
    has_tool_role,
    parse_tool_calls,
    tool_result_messages,
    tools_system_prompt,
)
from megatron_rl.environments.tools import TOOLS, make_tool
from megatron_rl.errors import UserError


@pytest.mark.parametrize(
    "expression, value",
    [
        ("17 + 25", "42"), ("2+3*4", "14"), ("(1+2)**3", "27"), ("-7 // 2", "-4"), ("7 % 3", "1"),
        ("1/4", "0.25"), ("2**-1", "0.5"), ("2.5 * 4", "10"), ("-(3 - 5)", "2"), ("+4", "4"),
        ("10 / 3", "3.33333333333"), ("2**1000 // 2**999", "2"),
    ],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert format_number(evaluate(expression)) == value


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("9**9**9", "exponent"), ("10**10**6", "exponent"), ("2**5000", "digits"), ("(10**999) * 10**999", "digits"),
        ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0**-1", "division by zero"),
        ("1e308 * 10", "finite"), ("(-8) ** 0.5", "negative"), ("10**400 / 3", "too large"),
        ("__import__('os').system('true')", "function call"), ("abs(-1)", "function call"), ("x + 1", "name 'x'"),
        ("'a' * 3", "constant 'a'"), ("1 < 2", "Compare"), ("[1, 2]", "List"), ("(1).real", "Attribute"),
        ("", "not a valid expression"), ("2 +", "not a valid expression"), ("1" * 600, "longer than"),
    ],
)
def test_calculator_refuses_everything_else_at_once(expression, reason):
    start = time.monotonic()
    with pytest.raises(CalculatorError, match=reason):
        evaluate(expression)
    assert time.monotonic() - start < 0.1


def test_parse_hermes_tool_calls():
    text = (
        "Let me compute.\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "17 + 25"}}\n</tool_call>\n'
        '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
    )
    assert parse_tool_calls(text) == [
        ToolCall("calculator", {"expression": "17 + 25"}),
        ToolCall("python", {"code": "print(1)"}),  # arguments written as a JSON string are accepted
    ]
    assert parse_tool_calls("The answer is 42.") == []
    # A call cut at max_new_tokens before its closing tag is still read.
    assert parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}') == [
        ToolCall("calculator", {"expression": "1+1"})
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<tool_call>{name: calculator}</tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"</tool_call>', "not valid JSON"),
        ("<tool_call>[1, 2]</tool_call>", '"name" and "arguments"'),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name" and "arguments"'),
        ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "must be a JSON object"),
        ("<tool_call></tool_call>", "not valid JSON"),
    ],
)
def test_malformed_calls_become_error_results(text, message):
    (result,) = parse_tool_calls(text)
    assert isinstance(result, ToolResult) and result.error and message in result.content


def _answer(text: str, names=("calculator", "python")) -> list[ToolResult]:
    tools = {n: make_tool(n, **({"timeout_s": 1.0} if n == "python" else {})) for n in names}
    return asyncio.run(answer_tool_calls(text, tools))


def test_tool_calls_are_answered_and_errors_never_raise():
    results = _answer(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "(17 + 25) * 2"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "9**9**9"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": 5}}</tool_call>'
        '<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'
        "<tool_call>not json</tool_call>"
    )
    assert [r.error for r in results] == [False, True, True, True, True, True]
    assert results[0].content == "84"
    assert "exponent" in results[1].content
    assert "unexpected 'expr'" in results[2].content
    assert "non-empty string argument 'expression'" in results[3].content
    assert "unknown tool 'search'; available: calculator, python" in results[4].content
    assert results[5].name is None and results[5].content.startswith("error:")


def test_python_tool_answers_with_output_or_the_sandbox_error():
    ok, loop, empty = _answer(
        '<tool_call>{"name": "python", "arguments": {"code": "print(sum(range(101)))"}}</tool_call>'
        '<tool_call>{"name": "python", "arguments": {"code": "while True: pass"}}</tool_call>'
        '<tool_call>{"name": "python", "arguments": {"code": "x = 1"}}</tool_call>'
    )
    assert (ok.error, ok.content) == (False, "5050\n")
    assert loop.error and "timed out after 1 s" in loop.content
    assert not empty.error and "printed nothing" in empty.content


def test_registry_lists_the_tools_and_names_unknown_ones():
    assert TOOLS.names() == ["calculator", "python"]
    with pytest.raises(UserError, match="Unknown tool 'shell'.*registered: calculator, python"):
        make_tool("shell")
    schema = make_tool("calculator").schema()
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]


def test_results_as_turns():
    results = [ToolResult("calculator", "42"), ToolResult(None, "error: bad", True)]
    assert tool_result_messages(results, tool_role=True) == [
        {"role": "tool", "content": "42"}, {"role": "tool", "content": "error: bad"}
    ]
    assert tool_result_messages(results, tool_role=False) == [
        {"role": "user", "content": "<tool_response>\n42\n</tool_response>\n<tool_response>\nerror: bad\n</tool_response>"}
    ]
    prompt = tools_system_prompt({"calculator": make_tool("calculator")})
    assert '<tool_call>\n{"name": "TOOL", "arguments": {...}}\n</tool_call>' in prompt
    assert '- calculator: Evaluate an arithmetic expression' in prompt and '{"expression": string}' in prompt


# A Hermes-style template with a tool turn (written for this test, in the shape Qwen's templates have):
# tool results go back inside <tool_response> blocks of a user turn.
HERMES_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m.get('tool_calls') %}<|im_start|>assistant\n{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_has_tool_role_tells_templates_apart():
    from megatron_rl.models.tiny import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # generic ChatML, like SmolLM2's: prints any role, knows no tools
    assert not has_tool_role(tokenizer)
    tokenizer.chat_template = HERMES_TEMPLATE
    assert has_tool_role(tokenizer)
    tokenizer.chat_template = "{{ raise_exception('no tools') if messages[-1]['role'] == 'tool' }}tool"
    assert not has_tool_role(tokenizer)
