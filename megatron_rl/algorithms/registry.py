"""Registries by name: policy losses, advantage estimators (and environments) plug in with a decorator.

    @register_policy_loss("my_loss")
    def my_loss(logprobs, mb, **settings): ...

The config names the entry (`grpo.loss=my_loss`); an unknown name is a UserError that lists what exists.
Built-ins live in modules that register on import, so a lookup imports them first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from megatron_rl.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object. `builtins` are module paths imported before the first lookup (they self-register)."""

    def __init__(self, what: str, config_key: str, builtins: tuple[str, ...] = ()) -> None:
        self.what, self.config_key, self.builtins = what, config_key, builtins
        self._table: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._table and self._table[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._table[name] = obj
            return obj

        return deco

    def _load_builtins(self) -> None:
        if not self._loaded:
            for module in self.builtins:
                importlib.import_module(module)
            self._loaded = True

    def get(self, name: str) -> T:
        self._load_builtins()
        if name not in self._table:
            raise UserError(
                f"Unknown {self.what} {name!r} (config key {self.config_key}); "
                f"registered: {', '.join(self.names())}."
            )
        return self._table[name]

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._table)


POLICY_LOSSES: Registry[Callable[..., Any]] = Registry(
    "policy loss",
    "grpo.loss",
    (
        "megatron_rl.algorithms.losses",
        "megatron_rl.algorithms.gspo",
        "megatron_rl.algorithms.dpo",
        "megatron_rl.algorithms.decoupled",
    ),
)
ADVANTAGES: Registry[Callable[..., Any]] = Registry(
    "advantage estimator", "grpo.advantage", ("megatron_rl.algorithms.advantages",)
)


def register_policy_loss(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A loss maps (logprobs [b, T], micro_batch, **settings) -> (loss_sum, count, metrics)."""
    return POLICY_LOSSES.register(name)


def register_advantage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An estimator maps (rewards [n_prompts * group_size], group_size, **settings) -> advantages [n]."""
    return ADVANTAGES.register(name)


def get_policy_loss(name: str) -> Callable[..., Any]:
    return POLICY_LOSSES.get(name)


def get_advantage(name: str) -> Callable[..., Any]:
    return ADVANTAGES.get(name)
