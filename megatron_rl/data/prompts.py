"""Prompt datasets for RL: the arithmetic generator or a JSONL file, rendered with the chat template,
behind one resumable iterator (state: position, epoch, seed)."""

from __future__ import annotations

from typing import Any

from megatron_rl.data.chat import render_prompt
from megatron_rl.data.jsonl import read_jsonl, read_prompt_answer
from megatron_rl.data.sampler import ResumableOrder
from megatron_rl.errors import UserError

__all__ = ["PromptDataset", "build_prompt_dataset", "build_prompt_splits", "held_out_size", "read_jsonl"]


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


def held_out_size(cfg: Any) -> int:
    """How many lines of data.path a JSONL GRPO run holds out for evaluation: data.val_size while it evaluates
    (run.eval_every > 0) and no separate data.val_path is given, else none."""
    d = cfg.data
    if d.kind != "jsonl" or not cfg.run.eval_every or d.val_path:
        return 0
    if d.val_size < 1:
        raise UserError(
            f"run.eval_every={cfg.run.eval_every} evaluates on held-out prompts, but data.val_size="
            f"{d.val_size} holds none out of {d.path}: set data.val_size >= 1 or data.val_path."
        )
    return d.val_size


def build_prompt_splits(cfg: Any, tokenizer: Any) -> tuple[PromptDataset, list[dict[str, Any]]]:
    """GRPO's training prompts and its evaluation prompts (run.eval_size of the held-out ones, rendered),
    which training never draws: arithmetic problems from far past any training index; for JSONL, the lines
    of data.val_path, or a seeded data.val_size lines of data.path removed from training."""
    from megatron_rl.data.arithmetic import HELD_OUT_START

    d = cfg.data
    n_eval = cfg.run.eval_size if cfg.run.eval_every else 0
    if d.kind == "environment":  # the environment supplies its tasks: env.problem(index)
        from megatron_rl.environments.base import make_environment

        env = make_environment(cfg.env.name, **cfg.env.kwargs)
        if not hasattr(env, "problem"):
            raise UserError(f"data.kind=environment: the environment {cfg.env.name!r} supplies no problems.")
        held_out = PromptDataset(env, tokenizer, d.system_prompt, endless=True)
        held_out.position = HELD_OUT_START
        return PromptDataset(env, tokenizer, d.system_prompt, endless=True), held_out.take(n_eval)
    if d.kind != "jsonl":
        held_out = build_prompt_dataset(d, tokenizer)
        held_out.position = HELD_OUT_START
        return build_prompt_dataset(d, tokenizer), held_out.take(n_eval)
    if not d.path:
        raise UserError("data.kind=jsonl needs data.path pointing to a JSONL file.")
    from megatron_rl.training.batching import holdout_split

    items = read_prompt_answer(d.path, d.prompt_key, d.answer_key)
    if d.val_path:
        train, held = items, read_prompt_answer(d.val_path, d.prompt_key, d.answer_key) if n_eval else []
    else:
        try:
            keep, out = holdout_split(len(items), 0.0, cfg.run.seed, count=held_out_size(cfg))
        except ValueError as exc:
            raise UserError(f"{d.path}: {exc}; lower data.val_size or give data.val_path.") from None
        train, held = [items[i] for i in keep], [items[i] for i in out]
    evaluation = PromptDataset(held, tokenizer, d.system_prompt, shuffle=False) if held else None
    return (
        PromptDataset(train, tokenizer, d.system_prompt),
        evaluation.take(min(n_eval, len(held))) if evaluation else [],
    )
