"""Tools an agent may call, by name: a calculator and a sandboxed Python interpreter.

    tool = make_tool("calculator")
    text = await tool.run({"expression": "17 + 25"})    # "42"; a ToolError for bad arguments

A tool is asynchronous so that a slow one (Python in a sandbox) does not stall other episodes; its result is
the observation text the model reads. `schema()` is the OpenAI-style function description chat templates
take (`apply_chat_template(..., tools=[...])`). New tools plug in with `@register_tool("name")`.
tool_calls.py parses the model's calls and turns results into conversation turns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from megatron_rl.algorithms.registry import Registry
from megatron_rl.environments.calculator import CalculatorError, evaluate, format_number
from megatron_rl.environments.sandbox import SandboxLimits, arun_python


class ToolError(Exception):
    """The call cannot be carried out as asked (missing or wrong argument, the tool's own failure); its
    message becomes the error observation the model reads."""


class Tool(ABC):
    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {}  # JSON schema of the arguments object

    @abstractmethod
    async def run(self, arguments: dict[str, Any]) -> str:
        """The observation text for one call; ToolError when the call is wrong."""

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def string_argument(self, arguments: dict[str, Any], key: str) -> str:
        """The one required string argument, or a ToolError that says what was expected."""
        unknown = sorted(set(arguments) - {key})
        if unknown:
            raise ToolError(f"{self.name} takes only {key!r}; got unexpected {', '.join(map(repr, unknown))}")
        value = arguments.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ToolError(f"{self.name} needs a non-empty string argument {key!r}")
        return value


TOOLS: Registry[type[Tool]] = Registry("tool", "env.tools", ("megatron_rl.environments.tools",))


def register_tool(name: str):
    return TOOLS.register(name)


def make_tool(name: str, **kwargs: Any) -> Tool:
    return TOOLS.get(name)(**kwargs)


@register_tool("calculator")
class CalculatorTool(Tool):
    name = "calculator"
    description = "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (17 + 25) * 3"}},
        "required": ["expression"],
    }

    async def run(self, arguments: dict[str, Any]) -> str:
        try:
            return format_number(evaluate(self.string_argument(arguments, "expression")))
        except CalculatorError as exc:
            raise ToolError(str(exc)) from None


@register_tool("python")
class PythonTool(Tool):
    """Runs the code in the sandbox (sandbox.py) and answers with what it printed."""

    name = "python"
    description = "Run a Python program (standard library only) and return what it prints."
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "a complete program; print the result"}},
        "required": ["code"],
    }

    def __init__(self, max_observation_chars: int = 2000, **limits: Any) -> None:
        self.limits = SandboxLimits(**limits)
        self.max_observation_chars = max_observation_chars

    async def run(self, arguments: dict[str, Any]) -> str:
        result = await arun_python(self.string_argument(arguments, "code"), self.limits)
        if not result.ok:
            tail = result.stderr.strip()[-self.max_observation_chars // 2 :]
            raise ToolError(f"{result.error}\n{tail}".strip())
        text = result.stdout if result.stdout.strip() else "(the program printed nothing)"
        if len(text) > self.max_observation_chars:
            text = text[: self.max_observation_chars] + "\n[output truncated]"
        return text
