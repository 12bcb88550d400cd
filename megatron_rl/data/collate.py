"""Padding a micro-batch of variable-length sequences into rectangular tensors.

A sequence is a dict with "ids" [L] (token ids) plus any per-token fields of length L-1 aligned with the
next-token logprobs (position t scores token t+1: "mask", "old_lp", "engine_lp", ...) and per-sequence
scalars ("adv"). Padding never gets a loss: per-token fields are zero past each sequence's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate_sequences(
    seqs: Sequence[dict[str, Any]], pad_id: int = 0, pad_to_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """input_ids [b, s] (s = longest, rounded up to pad_to_multiple), position_ids [b, s], lengths [b],
    each per-token field [b, s-1], each scalar field [b]."""
    if not seqs:
        raise ValueError("cannot collate an empty micro-batch")
    lengths = [len(s["ids"]) for s in seqs]
    width = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    b = len(seqs)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        # Pads continue counting past the end: harmless (never attended to by real tokens) and keeps RoPE
        # positions monotonic for kernels that assume so.
        "position_ids": torch.arange(width).unsqueeze(0).expand(b, -1).clone(),
        "lengths": torch.tensor(lengths, dtype=torch.long),
    }
    for i, s in enumerate(seqs):
        out["input_ids"][i, : lengths[i]] = torch.as_tensor(s["ids"])
    for key, value in seqs[0].items():
        if key == "ids":
            continue
        if torch.is_tensor(value) and value.dim() == 1:
            field = torch.zeros(b, width - 1, dtype=torch.float32)
            for i, s in enumerate(seqs):
                if s[key].shape != (lengths[i] - 1,):
                    raise ValueError(
                        f"sequence {i}: per-token field {key!r} has shape {tuple(s[key].shape)}, "
                        f"expected ({lengths[i] - 1},) for {lengths[i]} tokens"
                    )
                field[i, : lengths[i] - 1] = s[key]
            out[key] = field
        elif isinstance(value, (int, float)) or (torch.is_tensor(value) and value.dim() == 0):
            out[key] = torch.tensor([float(s[key]) for s in seqs])
    return out
