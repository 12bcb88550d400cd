"""Chat-template rendering: prompts for generation, and conversations with an assistant-only loss mask.

Assistant tokens are found by rendering incrementally: for assistant turn k, the conversation up to k with
the generation prompt is a prefix of the conversation including turn k; the tokens between the two are
that turn. This works for any template whose rendering of a prefix is a prefix of the rendering (true of
ChatML, Llama 3, Mistral, ...) and needs no `{% generation %}` markers; a template for which it does not
hold is reported instead of producing a wrong mask.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_rl.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def _ids(rendered: Any) -> list[int]:
    # transformers returns a BatchEncoding (dict-like) or a plain list depending on version/arguments.
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    return list(ids)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use a chat/instruct "
            "model's tokenizer or render prompts as plain text (use_chat_template=False)."
        )
    return _ids(
        tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    )


def render_prompt(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, use_chat_template: bool = True
) -> list[int]:
    """Token ids of [system?, user: prompt] followed by the assistant generation prompt.
    Without a chat template (base models): the plain text, system prompt first on its own paragraph."""
    if not use_chat_template:
        text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return _render(tokenizer, messages, add_generation_prompt=True)


def check_messages(messages: Any, where: str, require_assistant: bool = True) -> list[dict[str, str]]:
    """A list of {"role", "content": str} with known roles (and at least one assistant turn)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r}.")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role {m['role']!r}; known roles: {', '.join(ROLES)}.")
        if not isinstance(m["content"], str):
            raise UserError(
                f"{where}: message {i} content must be a string, got {type(m['content']).__name__}."
            )
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant message to train on.")
    return messages


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], where: str = "conversation", last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """(token ids, token mask) of the whole conversation; mask 1 on assistant-turn tokens up to and including
    the end-of-turn token (eos), 0 elsewhere (system/user text, template glue after the eos). With
    `last_turn_only` only the final assistant turn is trained (DPO: earlier turns are shared context)."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    eos = tokenizer.eos_token_id
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in turns[-1:] if last_turn_only else turns:
        before = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else []
        upto = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise UserError(
                f"{where}: the tokenizer's chat template does not render prefixes of this conversation as "
                "prefixes (it rewrites earlier turns), so assistant tokens cannot be located; train on "
                "single-turn prompt/response data instead."
            )
        span = list(range(len(before), len(upto)))
        ends = [i for i in span if full[i] == eos]
        if ends:  # text the template adds after the end-of-turn token is not the model's to predict
            span = [i for i in span if i <= ends[-1]]
        for i in span:
            mask[i] = 1
    return full, mask


def training_sequence(ids: list[int], token_mask: list[int]) -> dict[str, torch.Tensor]:
    """{"ids" [L], "mask" [L-1]}: mask[t] = 1 when token t+1 is trained, aligned with next-token logprobs
    (the policy's logprobs at position t score token t+1)."""
    return {
        "ids": torch.tensor(ids, dtype=torch.long),
        "mask": torch.tensor(token_mask[1:], dtype=torch.float32),
    }
