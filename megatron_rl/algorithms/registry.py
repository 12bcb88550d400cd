"""Registries by name (verl style): policy losses and advantage estimators plug in with a decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_rl.errors import UserError

_LOSSES: dict[str, Callable[..., Any]] = {}
_ADVANTAGES: dict[str, Callable[..., Any]] = {}


def _register(table: dict[str, Callable[..., Any]], name: str):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


def register_policy_loss(name: str):
    return _register(_LOSSES, name)


def register_advantage(name: str):
    return _register(_ADVANTAGES, name)


def _get(table: dict[str, Callable[..., Any]], name: str, what: str) -> Callable[..., Any]:
    from megatron_rl.algorithms import advantages, losses  # noqa: F401  (registers the built-ins)

    if name not in table:
        raise UserError(f"Unknown {what} {name!r}; registered: {', '.join(sorted(table))}.")
    return table[name]


def get_policy_loss(name: str) -> Callable[..., Any]:
    return _get(_LOSSES, name, "policy loss")


def get_advantage(name: str) -> Callable[..., Any]:
    return _get(_ADVANTAGES, name, "advantage estimator")
