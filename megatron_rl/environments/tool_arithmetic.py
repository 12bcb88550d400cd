"""Arithmetic with tools: the model may call the calculator (or run Python) before it answers.

A reply that makes tool calls (Hermes-style `<tool_call>{json}</tool_call>`, tool_calls.py) gets their
results as the next turn and no reward yet; the first reply that makes none is the final answer, scored
like the math environment (1 for the right number, else 0; `format_reward` for a wrong but readable one).
An episode that is still calling tools at `env.max_turns` ends with nothing.

The environment supplies its problems (`data.kind=environment`: "What is 47+38?", from the built-in
arithmetic generator with this environment's ranges) and demonstrations of tool use for an SFT warm start
(`demonstration(index)`: call the calculator, read the result, answer). `system_prompt` states the tool
format for models whose chat template has no tool turn (the recipe's `data.system_prompt` is this text);
`tool_role=true` sends results as "tool" messages to templates that have one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems
from megatron_rl.environments.base import Environment, Message, StepResult, register_environment
from megatron_rl.environments.math_verifier import MathVerifier
from megatron_rl.environments.tool_calls import (
    ToolResult,
    answer_tool_calls,
    tool_result_messages,
    tools_system_prompt,
)
from megatron_rl.environments.tools import Tool, make_tool
from megatron_rl.errors import UserError

FINAL_ANSWER = '\nWhen you know the result, reply with the final answer: "The answer is N."'


@register_environment("tool_arithmetic")
class ToolArithmetic(Environment):
    def __init__(
        self,
        tools: list[str] | tuple[str, ...] = ("calculator",),
        tool_role: bool = False,
        python_limits: dict[str, Any] | None = None,
        format_reward: float = 0.0,
        answer_key: str = "answer",
        min_value: int = 10,
        max_value: int = 99,
        ops: list[str] | tuple[str, ...] = ("+",),
        num_terms: int = 2,
        seed: int = 0,
    ) -> None:
        if not tools:
            raise UserError("env.kwargs.tools: name at least one tool (calculator, python).")
        self.tools: dict[str, Tool] = {
            name: make_tool(name, **(dict(python_limits or {}) if name == "python" else {})) for name in tools
        }
        self.tool_role = tool_role
        self.verifier = MathVerifier(format_reward=format_reward, answer_key=answer_key)
        self.problems = ArithmeticProblems(ArithmeticConfig(min_value, max_value, list(ops), num_terms, seed))
        self.system_prompt = tools_system_prompt(self.tools) + FINAL_ANSWER

    # Tasks and demonstrations

    def problem(self, index: int) -> dict[str, Any]:
        item = self.problems.problem(index)  # {"prompt": "47+38=", "answer": "85"}
        return {"prompt": f"What is {item['prompt'].removesuffix('=')}?", "answer": item["answer"]}

    def demonstration(self, index: int) -> list[Message]:
        """A solved problem: the calculator called on the expression, its result read back, the answer."""
        item = self.problems.problem(index)
        expression = item["prompt"].removesuffix("=")
        call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        result = ToolResult("calculator", item["answer"])
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": f"What is {expression}?"},
            {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
            *tool_result_messages([result], self.tool_role),
            {"role": "assistant", "content": f"The answer is {item['answer']}."},
        ]

    # Playing

    def score(self, responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        return self.verifier.score(responses, metadata)

    def step(self, histories: list[list[Message]], metadata: list[dict[str, Any]]) -> list[StepResult]:
        return [self._step(h[-1]["content"], meta) for h, meta in zip(histories, metadata)]

    def _step(self, reply: str, meta: dict[str, Any]) -> StepResult:
        # Steps run on the rollout's worker threads, which have no event loop of their own.
        results = asyncio.run(answer_tool_calls(reply, self.tools))
        if results:
            errors = sum(r.error for r in results)
            return StepResult(
                tool_result_messages(results, self.tool_role), 0.0, False,
                {"tools": [r.name for r in results]}, tool_calls=len(results), tool_errors=errors,
            )
        rewards, infos = self.verifier.score_with_info([reply], [meta])
        return StepResult(None, rewards[0], True, infos[0])
