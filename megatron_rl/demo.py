"""A short Megatron training demo on the tiny model: 2 ranks, TP=2 + sequence parallel, on CPU or GPU.

    python -m megatron_rl.demo [--steps N] [--tp 2]

It teaches a randomly initialised tiny Llama to continue arithmetic facts ("12+7=19") and shows the loss
falling. It exercises what GRPO training uses: Megatron Core model, TP/SP, vocab-parallel logprobs,
pipeline schedules, Megatron's optimizer and DDP.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

from megatron_rl import distributed
from megatron_rl.models.hf_config import load_hf_config
from megatron_rl.models.tiny import build_tokenizer, save_tiny_checkpoint
from megatron_rl.parallel import ParallelConfig
from megatron_rl.policy.core import MegatronPolicy
from megatron_rl.policy.optim import OptimConfig


def _facts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{a}+{b}={a + b}\n" for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]


def _batch(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    return torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])


def _loss(logprobs: torch.Tensor, mb: dict):
    mask = mb["mask"][:, 1:].float()
    return -(logprobs * mask).sum(), int(mask.sum()), {}


def _train(rank: int, model_dir: str, steps: int, tp: int) -> list[float]:
    from rich.progress import BarColumn, Progress, TextColumn

    par = ParallelConfig(tp=tp, sequence_parallel=tp > 1)
    distributed.initialize(par, seed=0)
    policy = MegatronPolicy(load_hf_config(model_dir), par, OptimConfig(lr=3e-3, weight_decay=0.0))
    tokenizer = build_tokenizer()
    losses = []
    columns = [
        TextColumn("[bold]demo"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
    ]
    with Progress(*columns, disable=rank != 0) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        for step in range(steps):
            ids = _batch(tokenizer, _facts(32, seed=step))
            mbs = [
                {"input_ids": ids[i : i + 16], "mask": ids[i : i + 16] != tokenizer.pad_token_id}
                for i in (0, 16)
            ]
            losses.append(policy.train_step(mbs, _loss)["loss"])
            bar.update(task, advance=1, loss=losses[-1])
    distributed.destroy_model_parallel()
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args(argv)
    model_dir = Path(tempfile.mkdtemp(prefix="megatron_rl_demo_")) / "tiny"
    save_tiny_checkpoint(model_dir, "llama")
    losses = distributed.spawn(_train, args.tp, str(model_dir), args.steps, args.tp)[0]
    print(
        f"loss: first {losses[0]:.3f} -> last {losses[-1]:.3f} over {len(losses)} steps (tp={args.tp}, SP on)"
    )
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
