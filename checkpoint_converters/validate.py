"""`validate`: run transformers and Megatron on the same prompts and compare logits; `inspect`: describe a
checkpoint directory (HF safetensors or Megatron torch_dist) from its metadata alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_rl import distributed
from megatron_rl.errors import UserError

PROMPTS = ["The capital of France is", "17 + 25 =", "def fibonacci(n):", "Megatron and vLLM"]


def _compare_rank(rank: int, hf_dir: str, megatron_dir: str, hf_config_dir: str | None) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint_converters.convert import read_megatron_dir
    from megatron_rl import platform
    from megatron_rl.models.hf_config import load_hf_config
    from megatron_rl.parallel import ParallelConfig
    from megatron_rl.policy.checkpoint import load_checkpoint
    from megatron_rl.policy.core import MegatronPolicy

    ckpt_dir, cfg_dir, _ = read_megatron_dir(megatron_dir, hf_config_dir)
    distributed.initialize(ParallelConfig(), seed=0)
    # fp32 whatever the stored dtype: the comparison is about the mapping, not rounding.
    policy = MegatronPolicy(load_hf_config(cfg_dir), ParallelConfig(), dtype=torch.float32, train=False)
    load_checkpoint(policy, ckpt_dir, with_optimizer=False)
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


def validate(
    hf_dir: str, megatron_dir: str, tolerance: float = 1e-4, hf_config_dir: str | None = None
) -> tuple[dict[str, float], bool]:
    """Logit comparison in a fresh single-rank process; ok when within tolerance and top-1 agrees."""
    from checkpoint_converters.convert import read_megatron_dir

    read_megatron_dir(megatron_dir, hf_config_dir)  # a bad path fails here, before a process starts
    result = distributed.spawn(_compare_rank, 1, hf_dir, megatron_dir, hf_config_dir)[0]
    ok = result["max_abs_logit_diff"] <= tolerance and result["top1_agreement"] == 1.0
    return result, ok


def _count(shape: Any) -> int:
    return int(torch.Size(shape).numel())


def inspect(directory: str, tensors: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, layout, dtypes and tensors of a checkpoint directory."""
    root = Path(directory)
    if (root / "conversion.json").is_file() or (root / "metadata.json").is_file():
        return _inspect_megatron(root, tensors)
    from checkpoint_converters.hf_io import HFCheckpoint
    from megatron_rl.models.hf_config import load_hf_config

    cfg = load_hf_config(root)
    ckpt = HFCheckpoint(root)
    names = ckpt.names()
    if not names:
        raise UserError(f"{root} holds no tensors.")
    infos = {n: ckpt.info(n) for n in names}
    out = {
        "format": "huggingface safetensors",
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "parameters": sum(_count(i.shape) for i in infos.values()),
        "bytes": ckpt.nbytes(),
        "dtypes": sorted({str(i.dtype).removeprefix("torch.") for i in infos.values()}),
        "tensors": len(names),
        "files": len({i.file for i in infos.values()}),
        "layers": cfg.get("num_hidden_layers"),
        "experts": cfg.get("num_experts") or cfg.get("num_local_experts"),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
    if tensors:
        out["tensor_list"] = {
            n: [str(i.dtype).removeprefix("torch."), list(i.shape)] for n, i in infos.items()
        }
    return out


def _inspect_megatron(root: Path, tensors: bool) -> dict[str, Any]:
    from checkpoint_converters.dist_ckpt import checkpoint_metadata

    meta: dict[str, Any] = {}
    ckpt = root
    if (root / "conversion.json").is_file():
        meta = json.loads((root / "conversion.json").read_text())
        ckpt = root / "model"
    stored = {k: v for k, v in checkpoint_metadata(ckpt).state_dict_metadata.items() if hasattr(v, "size")}
    files = [f for f in ckpt.iterdir() if f.is_file()]
    model_keys = {k: v for k, v in stored.items() if not k.startswith("optimizer")}
    out = {
        "format": "megatron torch_dist",
        "architecture": meta.get("architecture"),
        "layout": meta.get("layout"),
        "parameters": sum(_count(v.size) for v in model_keys.values()),
        "bytes": sum(f.stat().st_size for f in files),
        "dtypes": sorted({str(v.properties.dtype).removeprefix("torch.") for v in model_keys.values()}),
        "tensors": len(model_keys),
        "files": len(files),
        "source": meta.get("source"),
    }
    if tensors:
        out["tensor_list"] = {
            k: [str(v.properties.dtype).removeprefix("torch."), list(v.size)] for k, v in model_keys.items()
        }
    return out
