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


def dpo_turns(
    path: str | Path,
    lineno: int,
    row: dict[str, Any],
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
) -> tuple[list[dict[str, str]], str, str]:
    """One DPO line as (context messages, chosen reply, rejected reply), every field checked."""
    require_fields(path, lineno, row, (prompt_key, chosen_key, rejected_key))
    prompt = row[prompt_key]
    if isinstance(prompt, list):
        context = check_messages(prompt, f"{path}:{lineno}", require_assistant=False)
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
    return context, require_str(path, lineno, row, chosen_key), require_str(path, lineno, row, rejected_key)


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
        context, chosen, rejected = dpo_turns(path, lineno, row, prompt_key, chosen_key, rejected_key)
        context = with_system(context, system_prompt)
        pairs.append(
            {
                name: tokenized_or_error(
                    tokenizer,
                    [*context, {"role": "assistant", "content": reply}],
                    path,
                    lineno,
                    max_seq_len,
                    last_turn_only=True,
                )
                for name, reply in (("chosen", chosen), ("rejected", rejected))
            }
        )
    return pairs
