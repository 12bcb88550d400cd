"""Tool calls in the model's own format, and their results as the next conversation turn.

The format is Hermes-style, what Qwen's chat templates render and Qwen models emit:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "17 + 25"}}
    </tool_call>

`await answer_tool_calls(reply, tools)` parses every call in a reply, runs them concurrently and returns
one ToolResult each, in order. Nothing the model writes raises: bad JSON, an unknown tool, a wrong argument
or a failing tool each give a result with `error=True` whose text tells the model what went wrong.

`tool_result_messages(results, tool_role)` makes the observation turn(s). A chat template with a tool turn
(`has_tool_role(tokenizer)`: Qwen2.5/Qwen3 render role "tool" as <tool_response> blocks) gets one "tool"
message per result. A template without one (SmolLM2-135M-Instruct's renders any role name verbatim, and the
model never saw "tool") gets a single user message in the format TOOL_PROMPT states:

    <tool_response>
    42
    </tool_response>
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from megatron_rl.environments.base import Message
from megatron_rl.environments.tools import Tool, ToolError

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

TOOL_PROMPT = (
    "You can use tools. To call one, write\n"
    '<tool_call>\n{{"name": "TOOL", "arguments": {{...}}}}\n</tool_call>\n'
    "and stop; the result comes back as <tool_response>...</tool_response>. Tools:\n{tools}"
)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolResult:
    name: str | None  # None when the call could not even be read
    content: str
    error: bool = False


def parse_tool_calls(text: str) -> list[ToolCall | ToolResult]:
    """Every <tool_call> block in `text`, in order: a ToolCall, or an error ToolResult saying why the
    block is not a call (an unclosed last block, e.g. a reply cut at max_new_tokens, is read as if closed)."""
    out: list[ToolCall | ToolResult] = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body.strip())
        except json.JSONDecodeError as exc:
            out.append(ToolResult(None, f"error: the tool call is not valid JSON ({exc.msg})", True))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append(ToolResult(None, 'error: a tool call is a JSON object with "name" and "arguments"', True))
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments object as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            out.append(ToolResult(call["name"], '"arguments" must be a JSON object', True))
            continue
        out.append(ToolCall(call["name"], arguments))
    return out


async def answer_tool_calls(text: str, tools: dict[str, Tool]) -> list[ToolResult]:
    """Parse and run every tool call in `text` (concurrently); [] when it makes none."""
    parsed = parse_tool_calls(text)
    return list(await asyncio.gather(*(_answer(p, tools) for p in parsed)))


async def _answer(call: ToolCall | ToolResult, tools: dict[str, Tool]) -> ToolResult:
    if isinstance(call, ToolResult):
        return call
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return ToolResult(call.name, f"error: unknown tool {call.name!r}; available: {known}", True)
    try:
        return ToolResult(call.name, await tool.run(call.arguments))
    except ToolError as exc:
        return ToolResult(call.name, f"error: {exc}", True)
    except Exception as exc:  # a tool's own bug must not end the episode or the run
        return ToolResult(call.name, f"error: {call.name} failed ({type(exc).__name__}: {exc})", True)


def tool_result_messages(results: list[ToolResult], tool_role: bool) -> list[Message]:
    """The observation turn(s) for `results`: "tool" messages where the template has a tool turn, else
    one user message of <tool_response> blocks."""
    if tool_role:
        return [{"role": "tool", "content": r.content} for r in results]
    blocks = "\n".join(f"<tool_response>\n{r.content}\n</tool_response>" for r in results)
    return [{"role": "user", "content": blocks}]


def has_tool_role(tokenizer: Any) -> bool:
    """Whether the chat template knows a tool turn: it mentions tools, and renders a "tool" message.
    (A generic template that prints any role name, like SmolLM2's, renders one too, but never names it.)"""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    if not template or "tool" not in template:
        return False
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}}
        ]},
        {"role": "tool", "content": "RESULT-MARKER"},
    ]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates raise on roles they do not know
        return False
    return "RESULT-MARKER" in rendered


def tools_system_prompt(tools: dict[str, Tool]) -> str:
    """TOOL_PROMPT filled in with the tools' names, descriptions and arguments (for templates without
    tool support)."""
    lines = []
    for tool in tools.values():
        args = ", ".join(f'"{k}": {v.get("type", "any")}' for k, v in tool.parameters.get("properties", {}).items())
        lines.append(f"- {tool.name}: {tool.description} Arguments: {{{args}}}")
    return TOOL_PROMPT.format(tools="\n".join(lines))
