"""JSONL reading where every bad line is a UserError naming the file and the (1-based) line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError


def line_error(path: str | Path, lineno: int, message: str) -> UserError:
    return UserError(f"{path}:{lineno}: {message}")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; the file must exist, be UTF-8 and hold at least one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Dataset file {p} does not exist.")
    seen = False
    # Bytes, decoded line by line: a decoding error then names its line (text mode fails per chunk).
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(p, lineno, raw)
            if not line.strip():
                continue
            row = _parse(p, lineno, line)
            seen = True
            yield lineno, row
    if not seen:
        raise UserError(f"Dataset file {p} holds no examples.")


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    try:
        # utf-8-sig on the first line: editors on Windows start files with a byte-order mark.
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start : exc.start + 1].hex()
        raise line_error(
            path,
            lineno,
            f"not UTF-8 text (byte 0x{byte} at byte {exc.start + 1} of the line); save it as UTF-8.",
        ) from None


def _parse(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        # The newline is stripped first, so the column is on this line even when the line is cut short.
        if exc.msg.startswith("Unterminated string"):
            detail = (
                f"the string starting at column {exc.colno} is still open where the line ends, at column "
                f"{len(line) + 1}: is the line cut short?"
            )
        else:
            detail = f"{exc.msg} at column {exc.colno}"
            if exc.pos >= len(line.rstrip()):
                detail += ", the end of the line: is it cut short?"
        raise line_error(path, lineno, f"not valid JSON ({detail}).") from None
    if not isinstance(row, dict):
        raise line_error(path, lineno, f"expected a JSON object, got {type(row).__name__}.")
    return row


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


def prompt_answer(
    path: str | Path, lineno: int, row: dict[str, Any], prompt_key: str = "prompt", answer_key: str = "answer"
) -> dict[str, str]:
    """One RL prompt line as {"prompt", "answer"}, read from configurable fields."""
    require_fields(path, lineno, row, (prompt_key, answer_key))
    return {
        "prompt": require_str(path, lineno, row, prompt_key),
        "answer": require_str(path, lineno, row, answer_key, allow_number=True),
    }


def read_prompt_answer(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer"
) -> list[dict[str, str]]:
    """RL prompts: {"prompt", "answer"} items from configurable fields (data.prompt_key / data.answer_key)."""
    return [prompt_answer(path, lineno, row, prompt_key, answer_key) for lineno, row in iter_jsonl(path)]


def check_head(
    path: str | Path, check_row: Callable[[str | Path, int, dict[str, Any]], Any], lines: int
) -> None:
    """Reads only the first `lines` examples of the file through the loader's own per-line check: a missing,
    empty, non-UTF-8 or malformed file is reported before a run starts, without reading a large file twice."""
    for lineno, row in islice(iter_jsonl(path), lines):
        check_row(path, lineno, row)


def count_lines(path: str | Path) -> int:
    """Non-blank lines of the file (bytes only: no decoding or parsing)."""
    with Path(path).open("rb") as f:
        return sum(1 for raw in f if raw.strip())
