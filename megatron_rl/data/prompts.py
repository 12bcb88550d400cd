"""Prompt datasets for RL: the arithmetic generator or a JSONL file, rendered with the chat template,
behind one resumable iterator (its state is a single position)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every line must be a JSON object holding `required` fields; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Dataset file {p} does not exist.")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from exc
            if not isinstance(row, dict):
                raise UserError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}.")
            missing = [k for k in required if k not in row]
            if missing:
                raise UserError(f"{p}:{lineno}: missing field(s) {missing}; the line has {sorted(row)}.")
            rows.append(row)
    if not rows:
        raise UserError(f"Dataset file {p} holds no examples.")
    return rows


class PromptDataset:
    """Yields {"prompt_ids", "answer", "prompt"} items in a seeded order; `position` is the resume state."""

    def __init__(self, items: Any, tokenizer: Any, system_prompt: str | None = None, endless: bool = False):
        self.items, self.tokenizer, self.system_prompt = items, tokenizer, system_prompt
        self.endless = endless
        self.position = 0

    def _item(self, index: int) -> dict[str, Any]:
        if self.endless:
            return self.items.problem(index)
        return self.items[index % len(self.items)]

    def render(self, prompt: str) -> list[int]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            item = self._item(self.position)
            self.position += 1
            out.append({**item, "prompt_ids": self.render(item["prompt"])})
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def build_prompt_dataset(data_cfg: Any, tokenizer: Any) -> PromptDataset:
    from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems

    if data_cfg.kind == "arithmetic":
        from omegaconf import OmegaConf

        a = data_cfg.arithmetic
        cfg = ArithmeticConfig(**OmegaConf.to_container(a)) if OmegaConf.is_config(a) else a
        return PromptDataset(ArithmeticProblems(cfg), tokenizer, data_cfg.system_prompt, endless=True)
    if data_cfg.kind == "jsonl":
        if not data_cfg.path:
            raise UserError("data.kind=jsonl needs data.path pointing to a JSONL file.")
        rows = read_jsonl(data_cfg.path, (data_cfg.prompt_key, data_cfg.answer_key))
        items = [{"prompt": str(r[data_cfg.prompt_key]), "answer": str(r[data_cfg.answer_key])} for r in rows]
        return PromptDataset(items, tokenizer, data_cfg.system_prompt)
    raise UserError(f"Unknown data.kind {data_cfg.kind!r}; choose arithmetic or jsonl.")
