"""The one dtype table: config names, HF/vLLM names and safetensors codes agree, and a bad name is a UserError."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.dtypes import HF_NAMES, SAFETENSORS, SAFETENSORS_CODES, hf_name, precision
from megatron_rl.errors import UserError


def test_config_names_map_to_torch_and_to_hf_spelling() -> None:
    assert precision("bf16") is torch.bfloat16 and precision("fp32") is torch.float32
    assert precision("fp16") is torch.float16
    assert hf_name("bf16") == "bfloat16" and hf_name("fp32") == "float32"
    assert HF_NAMES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_safetensors_codes_round_trip() -> None:
    assert SAFETENSORS["BF16"] is torch.bfloat16 and SAFETENSORS_CODES[torch.float32] == "F32"
    assert all(SAFETENSORS[SAFETENSORS_CODES[d]] is d for d in SAFETENSORS.values())


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(UserError, match=r"Unknown dtype 'fp8'; choose among \['bf16', 'fp16', 'fp32'\]"):
        precision("fp8")
