"""DPO data: JSONL of {prompt, chosen, rejected}. The prompt is a string (one user turn) or a list of
messages (a multi-turn context); chosen and rejected are the competing assistant replies. Both replies are
tokenised as full conversations with the loss mask on the reply only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_rl.data.chat import check_messages
from megatron_rl.data.jsonl import iter_jsonl, line_error, require_fields, require_str
from megatron_rl.data.sft import tokenized_or_error, with_system


def load_dpo_pairs(
    path: str | Path,
    tokenizer: Any,
    *,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    system_prompt: str | None = None,
    max_seq_len: int | None = None,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """One {"chosen": {"ids", "mask"}, "rejected": {"ids", "mask"}} per line."""
    pairs = []
    for lineno, row in iter_jsonl(path):
        require_fields(path, lineno, row, (prompt_key, chosen_key, rejected_key))
        where = f"{path}:{lineno}"
        prompt = row[prompt_key]
        if isinstance(prompt, list):
            context = check_messages(prompt, where, require_assistant=False)
            if context[-1]["role"] == "assistant":
                raise line_error(
                    path, lineno, f"the {prompt_key!r} conversation must not end with an assistant turn."
                )
        elif isinstance(prompt, str):
            context = [{"role": "user", "content": prompt}]
        else:
            raise line_error(
                path,
                lineno,
                f"field {prompt_key!r} must be a string or a list of messages, got {type(prompt).__name__}.",
            )
        context = with_system(context, system_prompt)
        pair = {}
        for key, name in ((chosen_key, "chosen"), (rejected_key, "rejected")):
            reply = {"role": "assistant", "content": require_str(path, lineno, row, key)}
            pair[name] = tokenized_or_error(
                tokenizer, [*context, reply], path, lineno, max_seq_len, last_turn_only=True
            )
        pairs.append(pair)
    return pairs
