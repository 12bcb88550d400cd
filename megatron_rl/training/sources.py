"""SFT/DPO examples as token rows: a JSONL file (megatron_rl.data.sft / data.dpo: every line checked and
tokenized up front, errors name file and line) or the built-in arithmetic generator (endless, tokenized on
demand), with a held-out validation set either way (JSONL: a seeded share of the file, or data.val_path).

An example is a list of rows {"ids" [L], "mask" [L-1]}: one for SFT, [chosen, rejected] for DPO.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_rl.data.arithmetic import HELD_OUT_START
from megatron_rl.errors import UserError


@dataclass
class Examples:
    get: Callable[[int], list[dict[str, Any]]]  # index -> rows
    train: list[int] | None  # None: endless (arithmetic)
    val: list[int]


def _messages(prompt: str, answer: str | None, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": prompt})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _arithmetic(cfg: Any, tokenizer: Any, kind: str, val_fraction: float) -> Examples:
    from omegaconf import OmegaConf

    from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems
    from megatron_rl.data.chat import tokenize_conversation, training_sequence

    d = cfg.data
    a = d.arithmetic
    problems = ArithmeticProblems(
        ArithmeticConfig(**OmegaConf.to_container(a)) if OmegaConf.is_config(a) else a
    )

    def row(messages: list[dict[str, str]]) -> dict[str, Any]:
        return training_sequence(
            *tokenize_conversation(tokenizer, messages, "arithmetic", last_turn_only=True)
        )

    def get(i: int) -> list[dict[str, Any]]:
        p = problems.problem(i)
        chosen = row(_messages(p["prompt"], p["answer"], d.system_prompt))
        if kind == "sft":
            return [chosen]
        # DPO: a nearby wrong answer (seeded per problem) is the rejected reply.
        wrong = int(p["answer"]) + random.Random(f"{cfg.run.seed}:rejected:{i}").choice([-3, -2, -1, 1, 2, 3])
        return [chosen, row(_messages(p["prompt"], str(wrong), d.system_prompt))]

    val = list(range(HELD_OUT_START, HELD_OUT_START + d.val_size)) if val_fraction > 0 else []
    return Examples(get, None, val)


def _jsonl(cfg: Any, tokenizer: Any, kind: str, val_fraction: float) -> Examples:
    from megatron_rl.training.batching import holdout_split

    d = cfg.data
    if not d.path:
        raise UserError("data.kind=jsonl needs data.path pointing to a JSONL file.")
    common = {
        "prompt_key": d.prompt_key,
        "system_prompt": d.system_prompt,
        "max_seq_len": cfg.policy.max_seq_len,
    }

    def load(path: str) -> list[list[dict[str, Any]]]:
        if kind == "sft":
            from megatron_rl.data.sft import load_sft_sequences

            return [[s] for s in load_sft_sequences(path, tokenizer, **common)]
        from megatron_rl.data.dpo import load_dpo_pairs

        return [[p["chosen"], p["rejected"]] for p in load_dpo_pairs(path, tokenizer, **common)]

    rows = load(d.path)
    if d.val_path:  # a separate validation file: the training file is trained on whole
        val_rows = load(d.val_path) if val_fraction > 0 else []
        n = len(rows)
        return Examples((rows + val_rows).__getitem__, list(range(n)), list(range(n, n + len(val_rows))))
    try:
        train, val = holdout_split(len(rows), val_fraction, cfg.run.seed)
    except ValueError as exc:
        raise UserError(f"{d.path}: {exc}; lower the validation fraction or give data.val_path.") from None
    return Examples(rows.__getitem__, train, val)


def load_examples(cfg: Any, tokenizer: Any, kind: str, val_fraction: float) -> Examples:
    """kind: "sft" or "dpo". val_fraction: the share of a JSONL file held out (0: no validation)."""
    if cfg.data.kind == "jsonl":
        return _jsonl(cfg, tokenizer, kind, val_fraction)
    if cfg.data.kind == "arithmetic":
        return _arithmetic(cfg, tokenizer, kind, val_fraction)
    raise UserError(f"Unknown data.kind {cfg.data.kind!r} for {kind.upper()}; choose jsonl or arithmetic.")


def setting(section: Any, key: str, default: Any) -> Any:
    """section.key when the schema has it, else `default` (for fields a newer schema adds)."""
    return section[key] if key in section else default
