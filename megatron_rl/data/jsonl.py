"""JSONL reading where every bad line is a UserError naming the file and the (1-based) line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError


def line_error(path: str | Path, lineno: int, message: str) -> UserError:
    return UserError(f"{path}:{lineno}: {message}")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; the file must exist and hold at least one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Dataset file {p} does not exist (data.path).")
    seen = False
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise line_error(p, lineno, f"not valid JSON ({exc.msg} at column {exc.colno}).") from exc
            if not isinstance(row, dict):
                raise line_error(p, lineno, f"expected a JSON object, got {type(row).__name__}.")
            seen = True
            yield lineno, row
    if not seen:
        raise UserError(f"Dataset file {p} holds no examples.")


def require_fields(path: str | Path, lineno: int, row: dict[str, Any], fields: tuple[str, ...]) -> None:
    missing = [k for k in fields if k not in row]
    if missing:
        raise line_error(path, lineno, f"missing field(s) {missing}; the line has {sorted(row)}.")


def require_str(
    path: str | Path, lineno: int, row: dict[str, Any], key: str, allow_number: bool = False
) -> str:
    """The field as a string; numbers are accepted (and stringified) only where a number makes sense."""
    value = row[key]
    if isinstance(value, str):
        return value
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = "a string or number" if allow_number else "a string"
    raise line_error(path, lineno, f"field {key!r} must be {kind}, got {type(value).__name__}.")


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """All objects of the file; each must hold the `required` fields."""
    rows = []
    for lineno, row in iter_jsonl(path):
        require_fields(path, lineno, row, required)
        rows.append(row)
    return rows


def read_prompt_answer(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer"
) -> list[dict[str, str]]:
    """RL prompts: {"prompt", "answer"} items from configurable fields (data.prompt_key / data.answer_key)."""
    items = []
    for lineno, row in iter_jsonl(path):
        require_fields(path, lineno, row, (prompt_key, answer_key))
        items.append(
            {
                "prompt": require_str(path, lineno, row, prompt_key),
                "answer": require_str(path, lineno, row, answer_key, allow_number=True),
            }
        )
    return items
