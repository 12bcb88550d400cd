"""Train-step throughput: Megatron Core policy vs transformers on the same model, batch and threads.

Both run in one process, interleaved round by round, so machine drift hits them alike. The Megatron side is a
full optimizer step (forward, backward, Adam); transformers is timed for forward+backward alone (the
issue's yardstick) and with an AdamW step (the like-for-like training step).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from megatron_rl import distributed
from megatron_rl.models.hf_config import load_hf_config
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.core import MegatronPolicy
from megatron_rl.policy.optim import OptimConfig


def _nll(logprobs: torch.Tensor, mb: dict[str, Any]):
    return -logprobs.sum(), logprobs.numel(), {}


def _time(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_model(model_dir: str | Path, name: str, batch: int, seq: int, rounds: int = 5) -> dict[str, Any]:
    """Tokens/s of one training step at [batch, seq], Megatron vs transformers, fp32."""
    from transformers import AutoModelForCausalLM

    distributed.initialize(ParallelConfig(), seed=0)
    hf_cfg = load_hf_config(model_dir)
    policy = MegatronPolicy(hf_cfg, ParallelConfig(), OptimConfig(lr=1e-5))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    ids = torch.randint(0, hf_cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    mbs = [{"input_ids": ids}]

    def megatron_step() -> None:
        policy.train_step(mbs, _nll)

    def hf_fwd_bwd() -> None:
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids).loss.backward()

    def hf_step() -> None:
        hf_fwd_bwd()
        opt.step()

    for _ in range(2):  # warm-up: lazy inits, and the heap growing to the steps' peak (platform.cpu_kernels)
        for fn in (megatron_step, hf_fwd_bwd, hf_step):
            fn()
    m, f, s = [], [], []
    for _ in range(rounds):  # interleaved so drift affects all three alike
        m += _time(megatron_step, 1)
        f += _time(hf_fwd_bwd, 1)
        s += _time(hf_step, 1)
    tokens = batch * seq
    med = {k: statistics.median(v) for k, v in (("m", m), ("f", f), ("s", s))}
    result = {
        "bench": "train",
        "model": name,
        "params": sum(p.numel() for p in hf.parameters()),
        "batch": batch,
        "seq_len": seq,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "megatron_tokens_per_s": tokens / med["m"],
        "transformers_fwd_bwd_tokens_per_s": tokens / med["f"],
        "transformers_train_step_tokens_per_s": tokens / med["s"],
        "speedup_vs_transformers": med["f"] / med["m"],
        "speedup_vs_transformers_train_step": med["s"] / med["m"],
    }
    distributed.destroy_model_parallel()
    return result
