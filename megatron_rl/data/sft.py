"""SFT data: JSONL of conversations ({"messages": [...]}) or of prompt/response pairs, tokenised with the
chat template; the loss mask covers assistant tokens only. Every problem names the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_rl.data.chat import check_messages, tokenize_conversation, training_sequence
from megatron_rl.data.jsonl import iter_jsonl, line_error, require_str


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepends the configured system prompt unless the conversation brings its own."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def tokenized_or_error(
    tokenizer: Any,
    messages: list[dict[str, str]],
    path: str | Path,
    lineno: int,
    max_seq_len: int | None,
    last_turn_only: bool = False,
) -> dict[str, torch.Tensor]:
    ids, token_mask = tokenize_conversation(tokenizer, messages, f"{path}:{lineno}", last_turn_only)
    if max_seq_len is not None and len(ids) > max_seq_len:
        # Truncating would cut the answer (the part that is trained); make the user decide.
        raise line_error(
            path,
            lineno,
            f"{len(ids)} tokens exceed the maximum sequence length {max_seq_len} (policy.max_seq_len).",
        )
    seq = training_sequence(ids, token_mask)
    if not seq["mask"].any():
        raise line_error(path, lineno, "no assistant token to train on after tokenisation.")
    return seq


def sft_messages(
    path: str | Path,
    lineno: int,
    row: dict[str, Any],
    messages_key: str = "messages",
    prompt_key: str = "prompt",
    response_key: str = "response",
) -> list[dict[str, str]]:
    """One SFT line as a conversation: `messages_key` (a checked list of messages), else a prompt and a
    response as one user and one assistant turn."""
    if messages_key in row:
        return check_messages(row[messages_key], f"{path}:{lineno}")
    if prompt_key in row and response_key in row:
        return [
            {"role": "user", "content": require_str(path, lineno, row, prompt_key)},
            {"role": "assistant", "content": require_str(path, lineno, row, response_key)},
        ]
    raise line_error(
        path,
        lineno,
        f"expected a {messages_key!r} list or {prompt_key!r} + {response_key!r} fields; "
        f"the line has {sorted(row)}.",
    )


def load_sft_sequences(
    path: str | Path,
    tokenizer: Any,
    *,
    messages_key: str = "messages",
    prompt_key: str = "prompt",
    response_key: str = "response",
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """One {"ids" [L], "mask" [L-1]} per line. A line holding `messages_key` is a conversation (every
    assistant turn is trained); otherwise it needs `prompt_key` and `response_key`."""
    out = []
    for lineno, row in iter_jsonl(path):
        messages = sft_messages(path, lineno, row, messages_key, prompt_key, response_key)
        out.append(
            tokenized_or_error(tokenizer, with_system(messages, system_prompt), path, lineno, max_seq_len)
        )
    return out
