"""SFT warm start for tiny models: a random tiny model never answers correctly, so RL would have no signal.

A few hundred Megatron SFT steps on the recipe's arithmetic format give partial accuracy that GRPO then
raises. Runs in its own process (world 1) and writes a normal HF directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_rl import distributed


def _nll(logprobs: torch.Tensor, mb: dict[str, Any]):
    mask = mb["mask"]
    return -(logprobs * mask).sum(), int(mask.sum()), {}


def _environment_batches(tok: Any, name: str, kwargs: dict[str, Any]):
    """SFT batches of an environment's played demonstrations (`demonstration(index)`), model turns trained."""
    from megatron_rl.data.chat import tokenize_conversation, training_sequence
    from megatron_rl.environments.base import make_environment

    env = make_environment(name, **kwargs)
    index = 10_000_000  # away from the RL problems' indices
    while True:
        batch = []
        for _ in range(32):
            batch.append(training_sequence(*tokenize_conversation(tok, env.demonstration(index))))
            index += 1
        yield batch


def _train(
    rank: int,
    hf_dir: str,
    out_dir: str,
    steps: int,
    arithmetic: dict[str, Any],
    lr: float,
    environment: tuple[str, dict[str, Any]] | None = None,
) -> float:
    from transformers import AutoTokenizer

    from checkpoint_converters import export_hf_weights, load_hf_weights
    from checkpoint_converters.hf_io import write_hf_checkpoint
    from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems
    from megatron_rl.data.collate import collate_sequences
    from megatron_rl.data.prompts import PromptDataset
    from megatron_rl.models.hf_config import load_hf_config
    from megatron_rl.parallel import ParallelConfig
    from megatron_rl.policy.core import MegatronPolicy
    from megatron_rl.policy.optim import OptimConfig

    distributed.initialize(ParallelConfig(), seed=0)
    policy = MegatronPolicy(load_hf_config(hf_dir), ParallelConfig(), OptimConfig(lr=lr, weight_decay=0.0))
    load_hf_weights(policy.model, hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # A different seed from the RL prompts: the warm start must not memorise the evaluation problems.
    data = PromptDataset(
        ArithmeticProblems(ArithmeticConfig(**{**arithmetic, "seed": 10_000 + arithmetic["seed"]})),
        tok,
        endless=True,
    )
    loss = float("nan")
    if environment is not None:
        batches = _environment_batches(tok, *environment)
        for _ in range(steps):
            loss = policy.train_step([collate_sequences(next(batches))], _nll)["loss"]
        steps = 0
    for _ in range(steps):
        seqs = []
        for item in data.take(32):
            answer = tok(item["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = item["prompt_ids"] + answer
            mask = torch.zeros(len(ids) - 1)
            mask[len(item["prompt_ids"]) - 1 :] = 1.0
            seqs.append({"ids": torch.tensor(ids), "mask": mask})
        loss = policy.train_step([collate_sequences(seqs)], _nll)["loss"]
    write_hf_checkpoint(export_hf_weights(policy.model), hf_dir, out_dir, overwrite=True)
    distributed.destroy_model_parallel()
    return loss


def sft_warm_start(
    hf_dir: str | Path,
    out_dir: str | Path,
    steps: int,
    arithmetic: dict[str, Any],
    lr: float = 1e-3,
    environment: tuple[str, dict[str, Any]] | None = None,
) -> float:
    """Returns the final SFT loss; the warmed-up model is written to `out_dir`. With `environment` (name,
    kwargs: data.kind=environment) it trains on that environment's demonstrations instead of arithmetic."""
    return distributed.spawn(
        _train, 1, str(hf_dir), str(out_dir), steps, arithmetic, lr, environment, log_name="warm_start"
    )[0]
