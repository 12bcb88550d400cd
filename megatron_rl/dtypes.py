"""The one dtype table: the short names configs and CLIs use, HF config.json's names, safetensors' codes.

Configs say "fp32"/"bf16" (`model.dtype`, the converter's `--dtype`); Hugging Face's config.json and vLLM
say "float32"/"bfloat16"; safetensors headers (files and the refit buckets, which share the format) say
"F32"/"BF16".
"""

from __future__ import annotations

import torch

from megatron_rl.errors import UserError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# "float32", "bfloat16", "float16": torch's own names, which config.json's torch_dtype and vLLM use.
HF_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in PRECISIONS.values()}

SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS.items()}


def precision(name: str) -> torch.dtype:
    """The torch dtype of a config/CLI name ("fp32", "bf16", "fp16")."""
    if name not in PRECISIONS:
        raise UserError(f"Unknown dtype {name!r}; choose among {sorted(PRECISIONS)}.")
    return PRECISIONS[name]


def hf_name(name: str) -> str:
    """The Hugging Face / vLLM spelling of a config name: "bf16" -> "bfloat16"."""
    return str(precision(name)).removeprefix("torch.")
