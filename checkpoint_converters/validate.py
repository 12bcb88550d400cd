"""`validate`: run transformers and Megatron on the same prompts and compare logits; `inspect`: describe a dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_rl import distributed
from megatron_rl.errors import UserError

PROMPTS = ["The capital of France is", "17 + 25 =", "def fibonacci(n):", "Megatron and vLLM"]


def _compare_rank(rank: int, hf_dir: str, megatron_dir: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint_converters.convert import _build, _read_megatron_dir
    from megatron_rl import platform
    from megatron_rl.parallel import ParallelConfig
    from megatron_rl.policy.checkpoint import load_checkpoint

    meta, hf_cfg = _read_megatron_dir(megatron_dir)
    policy = _build(hf_cfg, ParallelConfig(), "fp32")
    load_checkpoint(policy, Path(megatron_dir) / "model", with_optimizer=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    worst, cos_min, agree, total = 0.0, 1.0, 0, 0
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            ref = hf(ids).logits[0]
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            got = policy.model[0](ids, pos, platform.attention_mask(ids.shape[1]))[0].float()
        worst = max(worst, (got - ref).abs().max().item())
        cos_min = min(cos_min, torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item())
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ids.shape[1]
    distributed.destroy_model_parallel()
    return {
        "max_abs_logit_diff": worst,
        "min_cosine": cos_min,
        "top1_agreement": agree / total,
        "tokens": total,
    }


def validate(hf_dir: str, megatron_dir: str, tolerance: float = 1e-4) -> tuple[dict[str, float], bool]:
    result = distributed.spawn(_compare_rank, 1, hf_dir, megatron_dir)[0]
    ok = result["max_abs_logit_diff"] <= tolerance and result["top1_agreement"] == 1.0
    return result, ok


def inspect(directory: str) -> dict[str, Any]:
    root = Path(directory)
    if (root / "conversion.json").is_file():
        meta = json.loads((root / "conversion.json").read_text())
        files = list((root / "model").glob("*"))
        return {
            "kind": "megatron torch_dist",
            **meta,
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files if f.is_file()),
        }
    from checkpoint_converters.hf_io import HFCheckpoint
    from megatron_rl.models.hf_config import load_hf_config

    cfg = load_hf_config(root)
    ckpt = HFCheckpoint(root)
    names = ckpt.names()
    params, dtypes = 0, set()
    for n in names:
        sl = ckpt._handles[ckpt.location[n]].get_slice(n)
        params += int(torch.tensor(sl.get_shape()).prod().item()) if sl.get_shape() else 1
        dtypes.add(str(sl.get_dtype()))
    if not names:
        raise UserError(f"{root} holds no tensors.")
    return {
        "kind": "huggingface safetensors",
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "parameters": params,
        "dtypes": sorted(dtypes),
        "tensors": len(names),
        "files": len(set(ckpt.location.values())),
        "layers": cfg.get("num_hidden_layers"),
        "experts": cfg.get("num_experts") or cfg.get("num_local_experts"),
        "first_tensors": sorted(names)[:5],
    }
