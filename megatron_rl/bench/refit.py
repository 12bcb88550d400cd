"""Refit throughput: Megatron policy -> vLLM engine through shared-memory buckets, against the naive path
(write an HF checkpoint to disk, engine reloads from that path) and a plain copy of the same bytes.
Also reports generation tokens/s. Everything runs in one Ray session, for each model in turn."""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _llama_1b(path: Path) -> Path:
    from megatron_rl.models.tiny import save_tiny_checkpoint

    if (path / "config.json").is_file():
        return path
    # ~1.1B parameters, Llama shape (TinyLlama-like), random weights, bf16 on disk.
    return save_tiny_checkpoint(
        path,
        "llama",
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=32000,
        torch_dtype="bfloat16",
    )


def _model(name: str, cache: Path) -> tuple[Path, str]:
    if name == "smollm2":
        from megatron_rl.models.smollm2 import materialize_smollm2

        return materialize_smollm2(cache / "smollm2_135m"), "fp32"
    if name == "llama1b":
        return _llama_1b(cache / "llama_1b"), "bf16"
    raise SystemExit(f"unknown model {name!r}: choose smollm2 or llama1b")


def bench_one(name: str, cache: Path, rounds: int = 3) -> dict[str, Any]:
    from checkpoint_converters.hf_io import write_hf_checkpoint
    from megatron_rl.generation.base import EngineSettings, SamplingSettings
    from megatron_rl.generation.client import EngineClient
    from megatron_rl.grpo.policy_group import PolicyGroup
    from megatron_rl.grpo.policy_worker import PolicySpec

    model_dir, dtype = _model(name, cache)
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    policy = PolicyGroup(PolicySpec(str(model_dir), dtype=dtype), 1, gpus_per_rank=0, cpus_per_rank=1)
    engine = EngineClient(str(model_dir), EngineSettings(max_model_len=512, dtype=torch_dtype), num_cpus=1)
    try:
        refit = [engine.refit_from(policy, version=i + 1) for i in range(rounds)]
        nbytes = refit[0]["bytes"]
        naive = []
        for i in range(rounds):
            disk = Path(tempfile.mkdtemp(prefix="refit_naive_", dir=cache))
            start = time.perf_counter()
            write_hf_checkpoint(policy.hf_weights(), model_dir, disk / "hf", overwrite=True)
            engine.update_weights(
                sorted(str(p) for p in (disk / "hf").glob("*.safetensors")), version=100 + i
            )
            naive.append(time.perf_counter() - start)
            shutil.rmtree(disk, ignore_errors=True)
        src = torch.empty(int(nbytes), dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        copies = []
        for _ in range(rounds):
            start = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - start)
        prompts = [[1] + list(range(10, 42))] * 16
        start = time.perf_counter()
        out = engine.generate(prompts, SamplingSettings(temperature=1.0, max_new_tokens=64, n=1, seed=0))
        gen_s = time.perf_counter() - start
        tokens = sum(len(s.token_ids) for group in out for s in group)
    finally:
        engine.shutdown()
        policy.shutdown()
    t_refit = statistics.median(r["refit_s"] for r in refit)
    t_naive, t_copy = statistics.median(naive), statistics.median(copies)
    return {
        "bench": "refit",
        "model": name,
        "dtype": dtype,
        "bytes": int(nbytes),
        "rounds": rounds,
        "refit_s": t_refit,
        "refit_gb_per_s": nbytes / t_refit / 1e9,
        "naive_s": t_naive,
        "copy_s": t_copy,
        "copy_gb_per_s": nbytes / t_copy / 1e9,
        "speedup_vs_naive": t_naive / t_refit,
        "fraction_of_copy": t_copy / t_refit,
        "generation_tokens_per_s": tokens / gen_s,
    }


def run_refit_bench(models: list[str], cache: str | None = None) -> list[dict[str, Any]]:
    from megatron_rl.grpo.ray_utils import init_ray

    root = Path(cache or Path(tempfile.gettempdir()) / "megatron_rl_bench")
    root.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=4, log_to_driver=False)  # stdout carries only the JSON
    results = []
    for name in models:
        print(f"[bench refit] {name} ...", file=sys.stderr)
        results.append(bench_one(name, root))
    return results
