"""The GRPO controller: one process drives Megatron policy ranks and a group of vLLM engines through Ray."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any

from megatron_rl import console
from megatron_rl.algorithms.registry import get_advantage
from megatron_rl.config.schema import world_size
from megatron_rl.data.prompts import build_prompt_splits
from megatron_rl.environments.base import make_environment
from megatron_rl.generation.base import token_mult_prob_error
from megatron_rl.grpo import rollout
from megatron_rl.grpo.episodes import episode_setup
from megatron_rl.grpo.setup import build_engine, build_policy, derive_num_engines
from megatron_rl.models.starting_model import prepare_model
from megatron_rl.progress import BARS, step_progress
from megatron_rl.ray_utils import init_ray
from megatron_rl.training.run_dir import RunDir


class Timer(dict):
    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self[f"timing/{phase}_s"] = time.perf_counter() - start


def run(cfg: Any) -> int:
    from transformers import AutoTokenizer

    run_dir = RunDir(cfg)
    console.use_run_dir(run_dir.path)  # before Ray starts: its workers inherit where their logs go
    ranks = world_size(cfg) + (derive_num_engines(cfg) if not cfg.cluster.gpus_per_node else 0)
    init_ray(num_cpus=max(2, math.ceil(ranks * cfg.cluster.cpus_per_rank) + 1))
    model_dir = prepare_model(cfg, run_dir.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    data, eval_items = build_prompt_splits(cfg, tokenizer)  # evaluation prompts are never trained on
    env, advantage = make_environment(cfg.env.name, **cfg.env.kwargs), get_advantage(cfg.grpo.advantage)
    episodes = episode_setup(cfg, tokenizer)  # None unless multi-turn (env.max_turns > 1)
    g = cfg.grpo
    loss_settings = {
        k: g[k]
        for k in ("clip_low", "clip_high", "dual_clip", "loss_agg", "kl_coef", "kl_estimator", "tis_cap")
    }
    policy = build_policy(cfg, model_dir)
    engine = build_engine(cfg, model_dir, policy.placement_group, policy.bundle_of_rank)
    start = 0
    if (ckpt := run_dir.should_resume()) is not None:
        policy.load(str(ckpt / "policy"))
        state = RunDir.trainer_state(ckpt)
        start = state["step"]
        data.load_state_dict(state["data"])
        engine.refit_from(policy, version=start)
    run_dir.start_logging(start if ckpt is not None else -1)
    title, fields = BARS["grpo"]
    with step_progress(title, cfg.run.steps, start, fields) as bar:
        if start == 0 and cfg.run.eval_every:
            evaluation = rollout.evaluate(
                engine, eval_items, env, cfg.generation, cfg.run.eval_samples, episodes=episodes
            )
            run_dir.log(0, {**evaluation, **engine.step_metrics()})
        for step in range(start + 1, cfg.run.steps + 1):
            t = Timer()
            with t("step"):
                with t("generate"):
                    batch, metrics = rollout.collect(
                        engine, data, env, advantage, cfg, seed=cfg.run.seed * 100_003 + step
                    )
                seqs = batch.sequences(mask_truncated=g.overlong_filter)
                if seqs:
                    with t("logprobs"):
                        for seq, lp in zip(seqs, policy.logprobs(seqs)):
                            seq["old_lp"] = lp
                        if g.kl_coef:
                            for seq, lp in zip(seqs, policy.logprobs(seqs, reference=True)):
                                seq["ref_lp"] = lp
                    metrics["train/token_mult_prob_error"] = _mismatch(seqs)
                    with t("train"):
                        train = policy.train(seqs, g.loss, loss_settings)
                    metrics.update(
                        {k if k.startswith("memory/") else f"train/{k}": v for k, v in train.items()}
                    )
                    with t("refit"):
                        refit = engine.refit_from(policy, version=step)
                    metrics["refit/gb_per_s"] = refit["gb_per_s"]
                    # the engine's share (receive + load into its kernels); the rest is export + transport
                    metrics["refit/engine_load_s"] = refit.get("receive_s", 0.0) + refit.get("load_s", 0.0)
            metrics.update(t)
            metrics["throughput/tokens_per_s"] = sum(len(s["ids"]) for s in seqs) / t["timing/step_s"]
            if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                metrics.update(
                    rollout.evaluate(
                        engine, eval_items, env, cfg.generation, cfg.run.eval_samples, episodes=episodes
                    )
                )
            metrics.update(engine.step_metrics())  # which engines served, their speed, restarts
            run_dir.log(step, metrics)
            bar.update(step, metrics)
            # checkpoint_every=0: only the final checkpoint
            if (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or step == cfg.run.steps:
                run_dir.save_checkpoint(step, policy.save, {"data": data.state_dict()})
    if cfg.run.export_hf_at_end:
        from checkpoint_converters.hf_io import write_hf_checkpoint

        write_hf_checkpoint(policy.hf_weights(), model_dir, run_dir.path / "hf_export", overwrite=True)
    run_dir.close()
    engine.shutdown()
    policy.shutdown()
    return 0


def _mismatch(seqs: list[dict[str, Any]]) -> float:
    import torch

    lp = torch.cat([s["old_lp"] for s in seqs])
    engine = torch.cat([s["engine_lp"] for s in seqs])
    mask = torch.cat([s["resp"] for s in seqs])
    return token_mult_prob_error(lp, engine, mask)
