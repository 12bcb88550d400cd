"""Prompt datasets for RL: the arithmetic generator or a JSONL file, rendered with the chat template,
behind one resumable iterator (state: position, epoch, seed)."""

from __future__ import annotations

from typing import Any

from megatron_rl.data.chat import render_prompt
from megatron_rl.data.jsonl import read_jsonl, read_prompt_answer
from megatron_rl.data.sampler import ResumableOrder
from megatron_rl.errors import UserError

__all__ = ["PromptDataset", "build_prompt_dataset", "read_jsonl"]


class PromptDataset:
    """Yields {"prompt", "answer", "prompt_ids"} items. `items` is a list of {"prompt", "answer"}, or (with
    endless=True) a generator object with `problem(index)`, such as ArithmeticProblems."""

    def __init__(
        self,
        items: Any,
        tokenizer: Any,
        system_prompt: str | None = None,
        endless: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        use_chat_template: bool = True,
    ) -> None:
        self.items, self.tokenizer, self.system_prompt = items, tokenizer, system_prompt
        self.endless, self.use_chat_template = endless, use_chat_template
        self.order = ResumableOrder(None if endless else len(items), seed=seed, shuffle=shuffle)

    @property
    def position(self) -> int:
        return self.order.position

    @position.setter
    def position(self, value: int) -> None:
        self.order.position = value

    def render(self, prompt: str) -> list[int]:
        return render_prompt(self.tokenizer, prompt, self.system_prompt, self.use_chat_template)

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for index in self.order.take(n):
            item = self.items.problem(index) if self.endless else self.items[index]
            out.append({**item, "prompt_ids": self.render(item["prompt"])})
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def build_prompt_dataset(data_cfg: Any, tokenizer: Any, seed: int = 0, shuffle: bool = True) -> PromptDataset:
    """From the `data` config: kind, path, prompt_key, answer_key, system_prompt, arithmetic.*."""
    from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems

    if data_cfg.kind == "arithmetic":
        a = data_cfg.arithmetic
        if not isinstance(a, ArithmeticConfig):
            from omegaconf import OmegaConf

            a = ArithmeticConfig(**(OmegaConf.to_container(a) if OmegaConf.is_config(a) else dict(a)))
        return PromptDataset(ArithmeticProblems(a), tokenizer, data_cfg.system_prompt, endless=True)
    if data_cfg.kind == "jsonl":
        if not data_cfg.path:
            raise UserError("data.kind=jsonl needs data.path pointing to a JSONL file.")
        items = read_prompt_answer(data_cfg.path, data_cfg.prompt_key, data_cfg.answer_key)
        return PromptDataset(items, tokenizer, data_cfg.system_prompt, seed=seed, shuffle=shuffle)
    raise UserError(f"Unknown data.kind {data_cfg.kind!r}; choose arithmetic or jsonl.")
